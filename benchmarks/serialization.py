"""How long writing the response body takes for the largest response (2048 inputs x 1024 dimensions),
as embedserve does it (orjson straight from float32 arrays; base64 of the little-endian buffer) and as
the common alternatives would (stdlib json over Python floats; a pydantic response model), next to the
forward pass the same request needs. Prints a Markdown table.

    .venv/bin/python benchmarks/serialization.py [--inputs 2048] [--dims 1024] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from embedserve.protocol import EmbeddingResponse, render_embeddings
from embedserve.types import EmbeddingResult


def _best_ms(fn: Callable[[], bytes], repeat: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        size = len(fn())
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", type=int, default=2048)
    parser.add_argument("--dims", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.inputs, args.dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def ours(fmt: str) -> Callable[[], bytes]:
        result = EmbeddingResult(
            vectors=vectors,
            encoding_format=fmt,  # type: ignore[arg-type]
            token_counts=(100,) * args.inputs,
            model_id="bench",
        )
        return lambda: render_embeddings(result, "bench")

    def stdlib() -> bytes:
        data = [
            {"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in enumerate(vectors)
        ]
        return json.dumps(
            {
                "object": "list",
                "data": data,
                "model": "bench",
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            }
        ).encode()

    def pydantic() -> bytes:
        data = [
            {"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in enumerate(vectors)
        ]
        response = EmbeddingResponse(data=data, model="bench", usage={"prompt_tokens": 0, "total_tokens": 0})
        return response.model_dump_json().encode()

    rows = [
        ("embedserve, float (orjson from float32)", *_best_ms(ours("float"), args.repeat)),
        ("embedserve, base64 (little-endian float32)", *_best_ms(ours("base64"), args.repeat)),
        ("stdlib json over Python floats", *_best_ms(stdlib, args.repeat)),
        ("pydantic response model", *_best_ms(pydantic, args.repeat)),
    ]
    print(f"\n{args.inputs} x {args.dims} float32 vectors, median of {args.repeat}\n")
    print("| serializer | ms | body MB | ms per input |")
    print("|---|---:|---:|---:|")
    for name, ms, size in rows:
        print(f"| {name} | {ms:.0f} | {size / 1e6:.1f} | {ms / args.inputs:.3f} |")


if __name__ == "__main__":
    main()
