"""The corpus command's benchmark (`make bench-embed`): `embedserve embed` (the real command, a process of
its own) on the benchmark corpus (benchmarks/corpus.py) written as JSONL, into Parquet, against ONNX
Runtime in-process on the same graph and texts (benchmarks/load.py's baseline: tokenize, sort the whole
corpus by length, batches of 32). Prints a Markdown table of medians [min-max] over `--runs` runs, taken
in one run of this script; only the ratios compare.

The command is reported twice: whole process (interpreter start, model load, reading, embedding,
writing the Parquet file: what an operator waits for) and steady state (its own summary's embedding
seconds, from the model loaded to the output finished). The baseline is steady state: its session is
created and warmed up before the clock starts.

    .venv/bin/python benchmarks/embed_command.py [--limit 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import minilm_corpus

from load import MODEL, Row, _cell, _onnx_runtime


def _command(corpus_file: Path, out: Path) -> tuple[float, dict[str, Any]]:
    """One `embedserve embed` process: its wall seconds and its --json summary."""
    command = [
        sys.executable, "-m", "embedserve", "embed", str(corpus_file), "--model", MODEL,
        "--output", str(out), "--overwrite", "--json",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"embedserve embed failed ({done.returncode}): {done.stderr.strip()}")
    summary: dict[str, Any] = json.loads(done.stdout)
    return wall, summary


def _report(
    rows: list[Row], texts: int, tokens: int, runs: int, startup: list[float], load: list[float]
) -> None:
    by = {row.name: row for row in rows}
    print(
        f"\n{texts} texts, {tokens} tokens, {MODEL}, {os.cpu_count()} CPUs, {runs} runs: median [min-max]\n"
    )
    print("| load | inputs/s | tokens/s |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row.name} | {_cell(row.inputs_s)} | {_cell(row.tokens_s, '.0f')} |")

    def ratio(a: str, b: str) -> str:
        return f"{by[a].median('tokens_s') / by[b].median('tokens_s'):.2f}"

    print("\n| ratio (medians) | value | target |")
    print("|---|---:|---:|")
    print(f"| embed steady state / in-process ORT fp32 | {ratio(STEADY, ORT)} | >= 0.90 |")
    print(f"| embed whole process / in-process ORT fp32 | {ratio(WHOLE, ORT)} | - |")
    print(
        f"\nWhole process less steady state (interpreter start, model load): {_cell(startup, '.2f')} s, "
        f"of which the model's load: {_cell(load, '.2f')} s"
    )


ORT = "onnxruntime fp32 in-process (steady state)"
WHOLE = "embedserve embed -> Parquet, whole process"
STEADY = "embedserve embed -> Parquet, steady state"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=2000, help="corpus size")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    corpus, total_tokens = minilm_corpus(args.limit)

    ort, whole, steady = Row(ORT), Row(WHOLE), Row(STEADY)
    startup: list[float] = []
    load: list[float] = []
    with tempfile.TemporaryDirectory(prefix="embedserve-bench-embed-") as tmp:
        corpus_file = Path(tmp) / "corpus.jsonl"
        corpus_file.write_text(
            "".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(corpus))
        )
        out = Path(tmp) / "vectors.parquet"
        _onnx_runtime(corpus[:64])  # the ONNX graph exported and cached before anything is timed
        small = Path(tmp) / "small.jsonl"
        small.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:64]))
        _command(small, out)  # (and the command's imports in the page cache)
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", file=sys.stderr)
            seconds = _onnx_runtime(corpus)
            ort.inputs_s.append(len(corpus) / seconds)
            ort.tokens_s.append(total_tokens / seconds)
            wall, summary = _command(corpus_file, out)
            assert summary["rows"] == len(corpus) and summary["tokens"] == total_tokens, summary
            whole.inputs_s.append(len(corpus) / wall)
            whole.tokens_s.append(total_tokens / wall)
            steady.inputs_s.append(len(corpus) / summary["seconds"])
            steady.tokens_s.append(total_tokens / summary["seconds"])
            startup.append(wall - summary["seconds"])
            load.append(summary["load_seconds"])
    _report([ort, whole, steady], len(corpus), total_tokens, args.runs, startup, load)


if __name__ == "__main__":
    main()
