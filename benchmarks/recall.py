"""What compact vectors (`output_dtype`) cost on a retrieval task with known answers, printed as a Markdown
table: recall@10 of int8/uint8 codes (by dot product and by L2), binary (Hamming) and binary rescored
with the float query, against float32's own top 10 and against the passage each query was made from.
Queries are compressed as their passages are (the float query only where it rescores).

Passages: the benchmark corpus (benchmarks/corpus.py, 2000 docstring paragraphs). Queries: for each of
`--queries` passages of at least 10 words, a span of about a third of its words (4 to 12), each word
then dropped with probability 0.2: a cropped, noisy paraphrase whose answer is its passage. The corpus
holds near-duplicate paragraphs (docstrings repeat their phrasing), so float32 finds most answers but
not all. Everything is embedded through embedserve.Engine, the vectors as the server returns them.

    .venv/bin/python benchmarks/recall.py [--model all-MiniLM-L6-v2] [--queries 500] [--dimensions N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import numpy.typing as npt
from corpus import minilm_corpus

from embedserve.engine import Engine
from embedserve.types import OutputDtype

K = 10
#: Binary rescoring: the top K x this by Hamming distance, rescored by the float query against each
#: passage's bits as +-1 (sentence-transformers' semantic_search_faiss / _usearch, rescore_multiplier 4),
#: or against its int8 vector read back to floats (the binary index in memory, int8 kept on disk).
RESCORE_MULTIPLIER = 4
CHUNK = 256  # inputs per engine call
Scores = npt.NDArray[np.float64]


def make_queries(passages: Sequence[str], count: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """-> (queries, the index of each one's passage)."""
    rng = random.Random(seed)
    candidates = [i for i, text in enumerate(passages) if len(text.split()) >= 10]
    chosen = rng.sample(candidates, min(count, len(candidates)))
    queries: list[str] = []
    for i in chosen:
        words = passages[i].split()
        span = min(12, max(4, round(len(words) / 3)))
        start = rng.randrange(len(words) - span + 1)
        kept = [word for word in words[start : start + span] if rng.random() >= 0.2]
        queries.append(" ".join(kept if len(kept) >= 3 else words[start : start + span]))
    return queries, chosen


async def embed_all(
    engine: Engine, model: str, texts: Sequence[str], dtype: OutputDtype, dimensions: int | None
) -> npt.NDArray[Any]:
    parts: list[npt.NDArray[Any]] = []
    for start in range(0, len(texts), CHUNK):
        result = await engine.embed(
            model, list(texts[start : start + CHUNK]), dimensions=dimensions, output_dtype=dtype
        )
        packed = result.vectors if dtype == "float32" else result.packed
        assert packed is not None
        parts.append(packed)
    return np.concatenate(parts)


def top_k(scores: Scores, k: int) -> npt.NDArray[np.int64]:
    """[Q, P] scores (higher is nearer) -> [Q, k] passage indices, best first (ties by index)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    out: npt.NDArray[np.int64] = order[:, :k]
    return out


def hamming(queries: npt.NDArray[np.uint8], passages: npt.NDArray[np.uint8]) -> Scores:
    """[Q, B] and [P, B] packed bits -> [Q, P] minus the Hamming distance."""
    differ = np.bitwise_xor(queries[:, None, :], passages[None, :, :])  # [Q, P, B]
    out: Scores = -np.unpackbits(differ, axis=-1).sum(axis=-1, dtype=np.int64).astype(np.float64)
    return out


def signs(bits: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.float32]:
    """[P, B] packed bits -> [P, width] +-1."""
    out: npt.NDArray[np.float32] = np.unpackbits(bits, axis=-1)[:, :width].astype(np.float32) * 2 - 1
    return out


def dequantized(levels: npt.NDArray[np.uint8], ranges: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """uint8 levels -> the middle of each one's step of the calibration range."""
    steps = (ranges[1] - ranges[0]) / 255
    out: npt.NDArray[np.float32] = (ranges[0] + (levels.astype(np.float32) + 0.5) * steps).astype(np.float32)
    return out


def rescored(
    float_queries: npt.NDArray[np.float32], hits: npt.NDArray[np.int64], passages: npt.NDArray[np.float32]
) -> npt.NDArray[np.int64]:
    """Each query's Hamming candidates reordered by the float query . the candidates' `passages` rows."""
    out = np.empty((len(hits), K), dtype=np.int64)
    for q, candidates in enumerate(hits):
        scores = passages[candidates] @ float_queries[q]
        out[q] = candidates[np.argsort(-scores, kind="stable")[:K]]
    return out


def overlap(found: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    """Mean fraction of float32's top K that `found` recovers."""
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]))


def answered(found: npt.NDArray[np.int64], answers: Sequence[int]) -> float:
    """Fraction of queries whose own passage is in `found`."""
    return float(np.mean([answer in row for row, answer in zip(found, answers, strict=True)]))


async def measure(args: argparse.Namespace) -> tuple[list[tuple[str, str, float, float]], float]:
    """-> the table's rows, and the fraction of the passages' float values outside the calibration
    ranges (which int8 clips to its end levels)."""
    passages, _ = minilm_corpus(args.corpus)
    queries, answers = make_queries(passages, args.queries)
    async with Engine.open(args.model) as engine:
        model, dims = args.model, args.dimensions
        spec = engine.catalog.resolve(model)
        calibration = engine.registry.calibration(spec)
        assert calibration is not None
        ranges = calibration.ranges[dims or spec.dimensions]
        vectors: dict[str, tuple[npt.NDArray[Any], npt.NDArray[Any]]] = {}
        for dtype in ("float32", "int8", "uint8", "ubinary"):
            vectors[dtype] = (
                await embed_all(engine, model, queries, dtype, dims),
                await embed_all(engine, model, passages, dtype, dims),
            )
    fq, fp = vectors["float32"]
    truth = top_k(fq.astype(np.float64) @ fp.T.astype(np.float64), K)
    iq, ip = (m.astype(np.int64) for m in vectors["int8"])
    uq, up = (m.astype(np.int64) for m in vectors["uint8"])
    bq, bp = vectors["ubinary"]
    distance = hamming(bq, bp)
    assert np.array_equal(uq - 128, iq) and np.array_equal(up - 128, ip)  # uint8 is int8 + 128
    uint8_l2 = -((uq**2).sum(1)[:, None] - 2 * uq @ up.T + (up**2).sum(1)[None, :])
    candidates = top_k(distance, K * RESCORE_MULTIPLIER)
    width, rescore = fq.shape[1], f"binary, top {K * RESCORE_MULTIPLIER} by Hamming rescored:"
    found: list[tuple[str, str, Callable[[], npt.NDArray[np.int64]]]] = [
        ("float32, dot", str(fp[0].nbytes), lambda: truth),
        ("int8, dot of the codes", str(ip.shape[1]), lambda: top_k((iq @ ip.T).astype(np.float64), K)),
        ("int8 or uint8, L2 of the codes", str(up.shape[1]), lambda: top_k(uint8_l2.astype(np.float64), K)),
        ("binary, Hamming", str(bp.shape[1]), lambda: top_k(distance, K)),
        (
            f"{rescore} float query . +-1 bits",
            str(bp.shape[1]),
            lambda: rescored(fq, candidates, signs(bp, width)),
        ),
        (
            f"{rescore} float query . int8 read back",
            f"{bp.shape[1]} + {ip.shape[1]}",
            lambda: rescored(fq, candidates, dequantized(up.astype(np.uint8), ranges)),
        ),
    ]
    rows = []
    for name, size, search in found:
        hits = search()
        rows.append((name, size, overlap(hits, truth), answered(hits, answers)))
    outside = float(np.mean((fp < ranges[0]) | (fp > ranges[1])))
    return rows, outside


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--corpus", type=int, default=2000)
    parser.add_argument("--dimensions", type=int, default=None, help="a Matryoshka width to truncate to")
    args = parser.parse_args()
    rows, outside = asyncio.run(measure(args))
    width = f", {args.dimensions} dims" if args.dimensions else ""
    print(f"\n{args.model}{width}: {args.queries} queries over {args.corpus} passages, recall@{K}\n")
    print(
        f"| passages as, scored by | bytes per vector | recall@{K} vs float32's top {K} | answer in top {K} |"
    )
    print("|---|---:|---:|---:|")
    for name, size, agree, answer in rows:
        print(f"| {name} | {size} | {agree:.3f} | {answer:.3f} |")
    print(f"\nPassage values outside the calibration ranges (int8 clips them): {outside:.2%}")


if __name__ == "__main__":
    main()
