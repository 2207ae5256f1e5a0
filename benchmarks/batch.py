"""The Batch API benchmark (`make bench-batch`): on the benchmark corpus (benchmarks/corpus.py), one
`embedserve serve` process, in one run repeated `--runs` times; prints a Markdown table of medians with
[min-max] and the ratios the issue sets targets for:

- batch throughput: the corpus as one batch (a line per text) on an idle server, from `batches.create` to
  `completed`, against the bulk HTTP load (requests of 32 inputs, 4 concurrent; benchmarks/load.py);
- online latency: the online load (one input per request, 16 concurrent) alone, and again while a batch
  of the corpus (three times over, so that it outlasts the load) runs.

`embedserve embed` against in-process ONNX Runtime is benchmarks/embed_command.py (the same target runs it).

    .venv/bin/python benchmarks/batch.py [--limit 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import minilm_corpus

from load import BENCH, MODEL, _bulk, _cell, _online, _pct, _port, _wait_ready


def _serve(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDSERVE_API_KEYS": ""}
    command = [sys.executable, "-m", "embedserve", "serve", "--port", str(port), "--model", MODEL]
    command += ["--data-dir", str(data_dir), "--log-level", "warning", "--sweep-interval", "3600"]
    log = (BENCH / f"batch-{port}.log").open("wb")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    _wait_ready(f"http://127.0.0.1:{port}/ready", proc)
    return proc, f"http://127.0.0.1:{port}/v1"


def _submit(sdk: OpenAI, corpus: list[str], copies: int = 1) -> str:
    lines = [
        {
            "custom_id": f"{copy}-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, "input": text, "encoding_format": "base64"},
        }
        for copy in range(copies)
        for i, text in enumerate(corpus)
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = sdk.files.create(file=("corpus.jsonl", data), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    return batch.id


def _wait(sdk: OpenAI, batch_id: str) -> None:
    while sdk.batches.retrieve(batch_id).status != "completed":
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=2000, help="corpus size")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    BENCH.mkdir(exist_ok=True)

    corpus, tokens = minilm_corpus(args.limit)

    bulk_s: list[float] = []
    batch_s: list[float] = []
    alone: dict[str, list[float]] = {"p50": [], "p99": []}
    beside: dict[str, list[float]] = {"p50": [], "p99": []}
    for run in range(args.runs):
        data_dir = BENCH / f"batch-data-{os.getpid()}-{run}"
        proc, base = _serve(data_dir)
        sdk = OpenAI(base_url=base, api_key="none", max_retries=0)
        try:
            asyncio.run(_bulk(base, MODEL, corpus[:96], 32, 2))  # warm-up
            bulk_s.append(len(corpus) / asyncio.run(_bulk(base, MODEL, corpus, 32, 4)))
            started = time.perf_counter()
            _wait(sdk, _submit(sdk, corpus))
            batch_s.append(len(corpus) / (time.perf_counter() - started))
            print(f"run {run}: bulk {bulk_s[-1]:.0f}/s, batch {batch_s[-1]:.0f}/s", file=sys.stderr)
            _, latencies = asyncio.run(_online(base, MODEL, corpus, 16))
            alone["p50"].append(_pct(latencies, 50))
            alone["p99"].append(_pct(latencies, 99))
            running = _submit(sdk, corpus, copies=3)
            while sdk.batches.retrieve(running).status != "in_progress":
                time.sleep(0.05)
            _, latencies = asyncio.run(_online(base, MODEL, corpus, 16))
            still = sdk.batches.retrieve(running)
            assert still.status == "in_progress", "the batch ended before the online load did"
            beside["p50"].append(_pct(latencies, 50))
            beside["p99"].append(_pct(latencies, 99))
            sdk.batches.cancel(running)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)

    ratio_throughput = [b / h for b, h in zip(batch_s, bulk_s, strict=True)]
    ratio_p99 = [w / a for w, a in zip(beside["p99"], alone["p99"], strict=True)]
    print(
        f"\nBatch API, {MODEL}, {len(corpus)} texts ({tokens} tokens), {args.runs} runs: median [min-max]\n"
    )
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| bulk HTTP (32 per request, 4 concurrent), inputs/s | {_cell(bulk_s)} | |")
    print(f"| one batch on an idle server, inputs/s | {_cell(batch_s)} | |")
    print(f"| batch / bulk throughput | {_cell(ratio_throughput, '.2f')} | >= 0.9 |")
    print(f"| online p50 / p99 alone, ms | {_cell(alone['p50'])} / {_cell(alone['p99'])} | |")
    print(
        f"| online p50 / p99 with a batch running, ms | {_cell(beside['p50'])} / {_cell(beside['p99'])} | |"
    )
    print(f"| p99 with a batch / alone | {_cell(ratio_p99, '.2f')} | <= 1.3 |")


if __name__ == "__main__":
    main()
