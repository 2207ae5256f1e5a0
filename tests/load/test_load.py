"""Load on loopback against a real `embedserve serve` process, bounded in count: below capacity no
request fails and resident memory stays flat across 10,000 requests; above capacity the overflow gets
503 at once (before the admitted work finishes) and the server recovers fully afterwards. Nothing here
asserts a duration: the machine is shared."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from support import ServerProcess, server_process

MODEL = "all-MiniLM-L6-v2"
MAX_QUEUED = 256
MAX_INPUTS = 64
CONCURRENCY = 16
WARM_UP = 2_500  # RSS settles within the first ~2,500 requests (allocator, ORT arena)
MEASURED = 10_000
#: Allowed RSS growth over the measured requests. A leak of even 1 KiB per request would be ~10 MiB.
RSS_SLACK_BYTES = 8 * 2**20


@pytest.fixture(scope="module")
def served() -> Iterator[ServerProcess]:
    with server_process(
        "--max-queued-inputs", str(MAX_QUEUED), "--max-inputs-per-request", str(MAX_INPUTS)
    ) as process:
        yield process


async def _closed_loop(base: str, requests: int, concurrency: int) -> dict[int, int]:
    """`requests` single-input requests from `concurrency` keep-alive connections; counts the statuses.
    A bare HTTP/1.1 client on asyncio streams: httpx would spend more of the two shared cores than the
    server under test."""
    host, port = base.removeprefix("http://").split(":")
    statuses: dict[int, int] = {}
    counter = iter(range(requests))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in counter:
                body = b'{"model": "%s", "input": "load test %d", "encoding_format": "base64"}' % (
                    MODEL.encode(),
                    i,
                )
                writer.write(
                    b"POST /v1/embeddings HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                    b"\r\nContent-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
                )
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def test_below_capacity_nothing_fails_and_memory_stays_flat_over_10000_requests(
    served: ServerProcess,
) -> None:
    assert asyncio.run(_closed_loop(served.base, WARM_UP, CONCURRENCY)) == {200: WARM_UP}
    before = served.rss_bytes()
    assert asyncio.run(_closed_loop(served.base, MEASURED, CONCURRENCY)) == {200: MEASURED}
    after = served.rss_bytes()
    assert after - before < RSS_SLACK_BYTES, f"RSS grew {(after - before) / 2**20:.1f} MiB"


def test_above_capacity_the_overflow_gets_503_at_once_and_the_server_recovers(served: ServerProcess) -> None:
    burst = 24  # x 64 inputs = 1536, six times what the queue admits
    texts = [
        f"overflow {i} " + "with a sentence of some forty tokens in it to give the model work " * 3
        for i in range(MAX_INPUTS)
    ]

    async def one(http: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        response = await http.post("/embeddings", json={"model": MODEL, "input": texts})
        return response, time.monotonic()

    async def main() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(
            base_url=f"{served.base}/v1", timeout=300, limits=httpx.Limits(max_connections=burst)
        ) as http:
            return await asyncio.gather(*(one(http) for _ in range(burst)))

    results = asyncio.run(main())
    ok = [done for response, done in results if response.status_code == 200]
    refused = [(response, done) for response, done in results if response.status_code == 503]
    assert len(ok) + len(refused) == burst, [r.status_code for r, _ in results]
    assert ok and refused
    for response, _ in refused:
        error = response.json()["error"]
        assert error["code"] == "server_overloaded"
        assert error["type"] == "server_error"
        assert response.headers["retry-after"] == "1"
    # At once: refused while the admitted work was still running, not after waiting for room.
    assert max(done for _, done in refused) < max(ok)
    assert sum(done < min(ok) for _, done in refused) >= 0.8 * len(refused)
    for response, _ in results:
        if response.status_code == 200:
            assert len(response.json()["data"]) == MAX_INPUTS

    assert httpx.get(f"{served.base}/ready").status_code == 200
    assert asyncio.run(_closed_loop(served.base, 200, CONCURRENCY)) == {200: 200}
    metrics = httpx.get(f"{served.base}/metrics").text
    assert f'embedserve_queue_depth_inputs{{model="{MODEL}"}} 0.0' in metrics
