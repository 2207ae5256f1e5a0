"""The rate-limit store's cost: a keyed client (rpm and tpm set, high enough never to refuse) against a
server with this process's buckets (the baseline) and one with the buckets in Redis, in the same run;
then the limiter alone (a request's admit, hold, settle and headers) on each store. Prints a Markdown
table of requests/s and latency p50/p99. Needs redis-server (Debian: apt-get install redis-server).

    .venv/bin/python benchmarks/ratelimit_store.py [--clients 8] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

from embedserve.ratelimit import LocalBuckets, RateLimiter
from embedserve.ratelimit.failover import Failover
from embedserve.ratelimit.redis_store import RedisBuckets, parse_store_url
from embedserve.types import Principal

MODEL = "all-MiniLM-L6-v2"
ADMIN = "sk-bench-admin"
TEXT = "a short sentence about rate limits shared by several servers"


@dataclass
class Row:
    what: str
    store: str
    per_s: float
    p50_ms: float
    p99_ms: float


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = _port()
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _serve(data_dir: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedserve", "serve", "--port", str(port), "--log-level", "warning",
         "--data-dir", str(data_dir), "--admin-key", ADMIN, *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not become ready")
        time.sleep(0.2)


async def _http_load(base: str, key: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "input": TEXT}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        stop = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                async with http.post(f"{base}/v1/embeddings", json=body, headers=headers) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    if set(statuses) != {200}:
        raise RuntimeError(f"expected only 200s, got {statuses}")
    return len(latencies) / elapsed, latencies


def _http_row(store: str, flags: list[str], clients: int, seconds: float) -> Row:
    with tempfile.TemporaryDirectory(prefix="embedserve-bench-limits-") as folder:
        proc, base = _serve(Path(folder), *flags)
        try:
            created = httpx.post(
                f"{base}/v1/keys",
                json={"name": "bench", "rpm": 2**31 - 1, "tpm": 2**31 - 1},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            created.raise_for_status()
            key = created.json()["key"]
            asyncio.run(_http_load(base, key, clients, 2.0))  # warm-up
            per_s, latencies = asyncio.run(_http_load(base, key, clients, seconds))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return Row("HTTP, keyed client", store, per_s, _pct(latencies, 50) * 1000, _pct(latencies, 99) * 1000)


async def _limiter_load(limiter: RateLimiter, clients: int, seconds: float) -> tuple[float, list[float]]:
    """A request's calls on the limiter, as the server makes them, from `clients` concurrent tasks."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        key = Principal(key_id=f"key_bench_{i}", rpm=2**31 - 1, tpm=2**31 - 1)
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await limiter.admit_request(key)
            hold = await limiter.hold_tokens(key, 64)
            await limiter.settle(hold, 14)
            await limiter.headers(key)
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return len(latencies) / (time.perf_counter() - began), latencies


def _limiter_row(store: str, url: str | None, clients: int, seconds: float) -> Row:
    async def main() -> tuple[float, list[float]]:
        if url is None:
            limiter = RateLimiter(LocalBuckets())
        else:
            limiter = RateLimiter(Failover(RedisBuckets(parse_store_url(url)), fallback="local"))
        try:
            await _limiter_load(limiter, clients, 1.0)
            return await _limiter_load(limiter, clients, seconds)
        finally:
            await limiter.close()

    per_s, latencies = asyncio.run(main())
    return Row("limiter alone", store, per_s, _pct(latencies, 50) * 1000, _pct(latencies, 99) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    redis, url = _start_redis()
    try:
        rows = [
            _http_row("in-process", [], args.clients, args.seconds),
            _http_row("Redis", ["--rate-limit-store", url], args.clients, args.seconds),
            _limiter_row("in-process", None, args.clients, args.seconds / 3),
            _limiter_row("Redis", url, args.clients, args.seconds / 3),
        ]
    finally:
        redis.kill()
        redis.wait()
    print(
        f"\n{args.clients} concurrent clients, {args.seconds:g} s per HTTP row; one short text per request."
    )
    print(
        f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)\n"
    )
    print("| measured | store | requests/s | vs in-process | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r.what == row.what and r.store == "in-process")
        print(
            f"| {row.what} | {row.store} | {row.per_s:,.0f} | {row.per_s / base.per_s:.2f}x | "
            f"{row.p50_ms:.2f} | {row.p99_ms:.2f} |"
        )
    print("\nOne run on a shared machine: compare rows of the same run only.")


if __name__ == "__main__":
    main()
