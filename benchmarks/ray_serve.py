"""Ray Serve against the single server, on the same cores, in one run (design note 56): `embedserve serve
--ray --replicas 2 --cpu-cores 1` (two replicas of one core each, behind Ray Serve's proxy, on a local
Ray) against `embedserve serve --cpu-cores 2`, under benchmarks/load.py's loads (bulk: requests of 32
inputs, 4 concurrent; online: one input per request, 16 concurrent). Prints a Markdown table and the
ratios (target: Ray Serve at least 0.8 of the single server). Timing belongs here, never in tests.

    .venv/bin/python benchmarks/ray_serve.py [--limit 1000] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import minilm_corpus

from load import BENCH, MODEL, Row, Server, _cell, _measure_server

RAY = "embedserve ray serve 2x1 core"
SINGLE = "embedserve single server 2 cores"


def _report(rows: list[Row], corpus: list[str], total_tokens: int, runs: int) -> None:
    print(
        f"\n{len(corpus)} texts, {total_tokens} tokens, {MODEL}, {os.cpu_count()} CPUs, "
        f"{runs} run(s): median [min-max]\n"
    )
    print("| server, load | inputs/s | tokens/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.name} | {_cell(row.inputs_s)} | {_cell(row.tokens_s, '.0f')} "
            f"| {_cell(row.p50, '.0f')} | {_cell(row.p99, '.0f')} |"
        )
    by = {row.name: row for row in rows}
    print("\n| ratio (medians), Ray Serve / single server | value | target |")
    print("|---|---:|---:|")
    for load in ("bulk", "online"):
        ray, single = (
            by[f"embedserve ray serve 2x1 core {load}"],
            by[f"embedserve single server 2 cores {load}"],
        )
        ratio = ray.median("tokens_s") / single.median("tokens_s")
        print(f"| {load} throughput (tokens/s) | {ratio:.2f} | >= 0.80 |")
    ray, single = by[f"{RAY} online"], by[f"{SINGLE} online"]
    for q in ("p50", "p99"):
        print(f"| online {q} | {ray.median(q) / single.median(q):.2f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=1000, help="corpus size")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    BENCH.mkdir(exist_ok=True)

    corpus, total_tokens = minilm_corpus(args.limit)

    # One data dir for both (the ONNX export is shared, the databases are fresh); the server's logs go
    # to .bench/. Ray on loopback, without its usage reporting.
    data_dir = tempfile.mkdtemp(prefix="embedserve-bench-ray-")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EMBEDSERVE_API_KEYS": "",
        "EMBEDSERVE_DATA_DIR": data_dir,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    serve = [sys.executable, "-m", "embedserve", "serve", "--port", "{port}", "--model", MODEL]
    servers = [
        Server(
            "embedserve single server 2 cores",
            [*serve, "--cpu-cores", "2", "--log-level", "warning"],
            MODEL,
            env,
        ),
        Server(
            RAY,
            [*serve, "--ray", "--replicas", "2", "--cpu-cores", "1", "--log-level", "warning"],
            MODEL,
            env,
        ),
    ]
    loads = {s.name: (Row(f"{s.name} bulk"), Row(f"{s.name} online")) for s in servers}
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}", file=sys.stderr)
        # Both in every run, in turns (the machine is shared: its load drifts between the two).
        for server in servers if run % 2 == 0 else servers[::-1]:
            _measure_server(server, corpus, total_tokens, *loads[server.name])
    rows = [row for name in loads for row in loads[name]]
    _report(rows, corpus, total_tokens, args.runs)


if __name__ == "__main__":
    main()
