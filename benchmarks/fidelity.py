"""Fidelity, printed as Markdown tables:
1. the served families against their model cards' recipes, straight from transformers: tiny random
   bge-m3 and Qwen3-Embedding checkpoints (built here, as the tests build them) served over HTTP from a
   private HF cache, on mixed-length inputs from the benchmark corpus;
2. all-MiniLM-L6-v2 served in fp32 and int8 (ONNX Runtime) against sentence-transformers, on the whole
   benchmark corpus (2000 texts).

    .venv/bin/python benchmarks/fidelity.py [--texts 64] [--corpus 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="embedserve-fidelity-hf-")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from corpus import build_corpus  # noqa: E402

from embedserve.postprocess import min_cosine  # noqa: E402
from embedserve.settings import Settings  # noqa: E402
from support import live_server  # noqa: E402
from tiny_models import (  # noqa: E402
    QWEN3_DEFAULT_TASK,
    bge_m3_reference,
    build_tiny_bge_m3,
    build_tiny_qwen3_embedding,
    install_in_hub_cache,
    qwen3_query,
    qwen3_reference,
    qwen3_reference_appending_eos,
)


def served(base: str, model: str, texts: list[str], **extra: object) -> np.ndarray:
    body = {"model": model, "input": texts, **extra}
    response = httpx.post(f"{base}/embeddings", json=body, timeout=600)
    response.raise_for_status()
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    return min_cosine(a, b), float(np.abs(a - b).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=64, help="corpus paragraphs for the families")
    parser.add_argument("--corpus", type=int, default=2000, help="corpus size for fp32 / int8")
    args = parser.parse_args()
    texts = build_corpus(lambda t: len(t.split()), size=args.texts)  # 5-250 words
    queries = [t[:80] for t in texts[:16]]
    hf_home = Path(os.environ["HF_HOME"])
    root = Path(tempfile.mkdtemp(prefix="embedserve-fidelity-"))
    bge = install_in_hub_cache(build_tiny_bge_m3(root / "bge-m3"), hf_home, "BAAI/bge-m3")
    qwen = install_in_hub_cache(
        build_tiny_qwen3_embedding(root / "Qwen3-Embedding-0.6B"), hf_home, "Qwen/Qwen3-Embedding-0.6B"
    )
    no_eos = build_tiny_qwen3_embedding(root / "no-eos" / "Qwen3-Embedding-0.6B", eos_in_tokenizer=False)
    catalog = root / "models.toml"
    catalog.write_text(
        '[[models]]\nsource = "BAAI/bge-m3"\n\n'
        '[[models]]\nsource = "Qwen/Qwen3-Embedding-0.6B"\n\n'
        f'[[models]]\nid = "qwen3-no-eos"\nsource = "{no_eos}"\n'
    )
    rows: list[tuple[str, Callable[[str], np.ndarray], np.ndarray]] = [
        ("bge-m3, documents", lambda b: served(b, "bge-m3", texts), bge_m3_reference(bge, texts)),
        (
            "Qwen3-Embedding, documents",
            lambda b: served(b, "Qwen3-Embedding-0.6B", texts),
            qwen3_reference(qwen, texts),
        ),
        (
            "Qwen3-Embedding, queries (default instruction)",
            lambda b: served(b, "Qwen3-Embedding-0.6B", queries, input_type="query"),
            qwen3_reference(qwen, [qwen3_query(QWEN3_DEFAULT_TASK, q) for q in queries]),
        ),
        (
            "Qwen3-Embedding, documents, dimensions=256",
            lambda b: served(b, "Qwen3-Embedding-0.6B", texts, dimensions=256),
            _renormalized(qwen3_reference(qwen, texts)[:, :256]),
        ),
        (
            "Qwen3-Embedding, tokenizer without EOS",
            lambda b: served(b, "qwen3-no-eos", texts),
            qwen3_reference_appending_eos(no_eos, texts),
        ),
    ]
    lengths = [len(t) for t in texts]
    print(
        f"{len(texts)} corpus paragraphs ({min(lengths)}-{max(lengths)} characters), one request each "
        "row; reference = the model card's recipe in one padded batch (fp32, CPU)\n"
    )
    print("| served | min cosine | max abs diff |")
    print("|---|---|---|")
    with live_server(Settings(models_file=catalog)) as live:
        for name, serve, reference in rows:
            cos, diff = compare(serve(live.v1), reference)
            print(f"| {name} | {cos:.7f} | {diff:.1e} |")
    _precisions(args.corpus)


def _precisions(size: int) -> None:
    """all-MiniLM-L6-v2 served in fp32 and int8 against sentence-transformers on the benchmark corpus."""
    from sentence_transformers import SentenceTransformer

    from support import bundled_folder

    reference_model = SentenceTransformer(str(bundled_folder()), device="cpu")
    corpus = build_corpus(lambda t: len(reference_model.tokenizer(t)["input_ids"]), size=size)
    reference = reference_model.encode(corpus, batch_size=32, normalize_embeddings=True)
    catalog = Path(tempfile.mkdtemp(prefix="embedserve-fidelity-")) / "models.toml"
    catalog.write_text(
        '[[models]]\nsource = "all-MiniLM-L6-v2"\n\n'
        '[[models]]\nid = "int8"\nsource = "all-MiniLM-L6-v2"\nquantize = "int8"\n'
    )
    print(
        f"\nall-MiniLM-L6-v2 on the {len(corpus)}-text benchmark corpus, against sentence-transformers fp32\n"
    )
    print("| served | min cosine | mean cosine | max abs diff |")
    print("|---|---|---|---|")
    with live_server(Settings(models_file=catalog)) as live:
        for name, model in (("onnx fp32", "all-MiniLM-L6-v2"), ("onnx int8", "int8")):
            got = np.concatenate(
                [served(live.v1, model, corpus[i : i + 256]) for i in range(0, len(corpus), 256)]
            )
            cos = (got * reference).sum(axis=1)
            print(f"| {name} | {cos.min():.4f} | {cos.mean():.4f} | {np.abs(got - reference).max():.1e} |")


def _renormalized(m: np.ndarray) -> np.ndarray:
    out: np.ndarray = m / np.linalg.norm(m, axis=1, keepdims=True)
    return out


if __name__ == "__main__":
    main()
