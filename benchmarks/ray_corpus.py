"""The Ray corpus job's benchmark (`make bench-ray`): `embedserve embed --engine ray` with 2
single-threaded actors on a local Ray against the local corpus command with the same total threads
(`--cpu-cores 2`), each the real command as a process of its own, on the same corpus (the benchmark
corpus, benchmarks/corpus.py, as JSONL) in the same run. Prints a Markdown table of medians [min-max]
over `--runs` runs (the two alternate); only the ratios compare.

Steady state is each command's own summary: the local command's from the model loaded to the output
finished; the Ray job's from its first piece started to its last shard written (the actors' clocks).
Whole process adds interpreter start, Ray's start (a local Ray per run) and the models' load.

    .venv/bin/python benchmarks/ray_corpus.py [--limit 2000] [--runs 3] [--pieces 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import minilm_corpus

from load import MODEL, Row, _cell

LOCAL = "embedserve embed (local, --cpu-cores 2)"
RAY = "embedserve embed --engine ray (2 replicas x 1 thread)"


def _command(*args: str) -> tuple[float, dict[str, Any]]:
    """One `embedserve embed` process: its wall seconds and its --json summary."""
    command = [sys.executable, "-m", "embedserve", "embed", *args, "--model", MODEL, "--overwrite", "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"embedserve embed failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    lines = done.stdout.splitlines()  # the summary is the last object (Ray may print before it)
    start = max(i for i, line in enumerate(lines) if line.startswith("{"))
    summary: dict[str, Any] = json.loads("\n".join(lines[start:]))
    return wall, summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=2000, help="corpus size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pieces", type=int, default=32, help="about how many pieces the Ray job cuts")
    args = parser.parse_args()

    corpus, total_tokens = minilm_corpus(args.limit)

    local, ray = Row(LOCAL), Row(RAY)
    whole: dict[str, list[float]] = {LOCAL: [], RAY: []}
    with tempfile.TemporaryDirectory(prefix="embedserve-bench-ray-") as tmp:
        source = Path(tmp) / "corpus.jsonl"
        source.write_text(
            "".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(corpus))
        )
        piece = str(max(1, source.stat().st_size // args.pieces))
        local_args = [str(source), "--output", f"{tmp}/local.parquet", "--cpu-cores", "2"]
        ray_args = [
            str(source), "--output", f"{tmp}/shards", "--engine", "ray", "--replicas", "2",
            "--threads-per-replica", "1", "--piece-bytes", piece,
        ]  # fmt: skip
        _command(*local_args)  # the ONNX graph exported and cached, the imports in the page cache
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", file=sys.stderr)
            for row, flags in ((local, local_args), (ray, ray_args)):
                wall, summary = _command(*flags)
                assert summary["rows"] == len(corpus) and summary["tokens"] == total_tokens, summary
                row.inputs_s.append(len(corpus) / summary["seconds"])
                row.tokens_s.append(total_tokens / summary["seconds"])
                whole[row.name].append(total_tokens / wall)
    print(
        f"\n{len(corpus)} texts, {total_tokens} tokens, {MODEL}, {os.cpu_count()} CPUs, {args.runs} runs: "
        "median [min-max]\n"
    )
    print("| job | rows | rows/s | tokens/s (steady) | tokens/s (whole process) |")
    print("|---|---:|---:|---:|---:|")
    for row in (local, ray):
        print(
            f"| {row.name} | {len(corpus)} | {_cell(row.inputs_s)} | {_cell(row.tokens_s, '.0f')} | "
            f"{_cell(whole[row.name], '.0f')} |"
        )
    ratio = ray.median("tokens_s") / local.median("tokens_s")
    whole_ratio = statistics.median(whole[RAY]) / statistics.median(whole[LOCAL])
    print("\n| ratio (medians) | value | target |")
    print("|---|---:|---:|")
    print(f"| Ray job / local command, steady state | {ratio:.2f} | >= 0.80 |")
    print(f"| Ray job / local command, whole process | {whole_ratio:.2f} | - |")


if __name__ == "__main__":
    main()
