"""Rate limits shared through Redis by two live servers on one database (the whole app on fake backends:
real tokenizers, keys, limits and ledger): a key's rpm and tpm hold across both, not per server; with
Redis killed, `local` serves from each server's own buckets (logged once per server, counted in the
metric) and shares again once Redis is back on its port; `refuse` answers 503 until then; a server
starts without its Redis; a malformed store URL stops `serve` with one line."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedserve.backends.fake import fake_backends
from embedserve.settings import Settings
from redis_server import RedisServer, redis_server, start_redis
from support import LiveServer, free_port, live_server, private_data_dir

MODEL = "all-MiniLM-L6-v2"
ADMIN = "sk-shared-limits-admin"
STATIC = "sk-shared-limits-unlimited"
RECOVERY_S = 15.0  # bound on a server finding Redis again (its probe backs off to one try every 2 s)
METRIC = "embedserve_rate_limit_store_errors_total"


def ids(n: int) -> list[int]:
    """A token-id input of exactly n tokens ([CLS] ... [SEP])."""
    return [101, *([1000] * (n - 2)), 102]


def embed(server: LiveServer, key: str, body: Any | None = None) -> httpx.Response:
    body = body or {"model": MODEL, "input": "x"}
    return httpx.post(
        f"{server.v1}/embeddings", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60
    )


def wait_for(condition: Callable[[], bool], timeout_s: float = RECOVERY_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def store_errors(server: LiveServer) -> float:
    for line in httpx.get(f"{server.base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(METRIC + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {METRIC}")


def assert_error(response: httpx.Response, status: int, code: str, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    assert (error["code"], error["type"], error["param"]) == (code, type_, None)
    return error


@contextmanager
def servers(
    data_dir: Path, store: str, count: int = 2, fallback: str = "local"
) -> Iterator[list[LiveServer]]:
    """`count` servers on one database and one rate-limit store."""
    settings = Settings(
        data_dir=data_dir,
        admin_keys=[ADMIN],
        api_keys=[STATIC],
        rate_limit_store=store,
        rate_limit_fallback=fallback,  # type: ignore[arg-type]
        usage_flush_interval=0.05,
    )
    with ExitStack() as stack:
        yield [stack.enter_context(live_server(settings, backends=fake_backends())) for _ in range(count)]


def create_key(servers: list[LiveServer], **limits: int) -> str:
    """A new key, once every server knows it."""
    created = httpx.post(
        f"{servers[0].v1}/keys",
        json={"name": "shared", **limits},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    key: str = created.json()["key"]
    for server in servers:
        wait_for(
            lambda s=server: (
                httpx.get(f"{s.v1}/models", headers={"Authorization": f"Bearer {key}"}).is_success
            )
        )  # type: ignore[misc]
    return key


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, shared_redis: RedisServer) -> Iterator[list[LiveServer]]:
    data_dir = private_data_dir(tmp_path_factory.mktemp("shared-limits") / "data")
    with servers(data_dir, shared_redis.url()) as both:
        yield both


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return private_data_dir(tmp_path / "data")


def test_a_key_with_rpm_30_gets_30_requests_a_minute_across_two_servers_not_30_each(
    pair: list[LiveServer],
) -> None:
    key = create_key(pair, rpm=30)
    # 40 at once, alternating servers. The bucket gives one request back every 2 s, so a burst that
    # took longer than that on a busy machine may pass one more per 2 s: counted, never guessed.
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: (i % 2, embed(pair[i % 2], key)), range(40)))
    refills = int((time.monotonic() - started) / 2)
    passed = sum(r.status_code == 200 for _, r in responses)
    assert 30 <= passed <= 30 + refills, (passed, refills)  # 30 in all, not 30 per server
    refused = [(i, r) for i, r in responses if r.status_code != 200]
    assert {i for i, _ in refused} == {0, 1}  # both servers refuse the key
    for _, response in refused:
        error = assert_error(response, 429, "rate_limit_exceeded", "requests")
        assert "30 requests per minute" in error["message"]
        assert 1 <= int(response.headers["retry-after"]) <= 2  # one request every 2 s
        assert response.headers["x-ratelimit-limit-requests"] == "30"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert embed(pair[0], STATIC).status_code == 200  # other keys are not touched


def test_a_key_tokens_per_minute_are_shared_across_two_servers(pair: list[LiveServer]) -> None:
    key = create_key(pair, tpm=100)
    ok = embed(pair[0], key, {"model": MODEL, "input": [ids(60)]})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 60
    refused = embed(pair[1], key, {"model": MODEL, "input": [ids(50)]})
    error = assert_error(refused, 429, "rate_limit_exceeded", "tokens")
    assert "50 tokens" in error["message"]
    assert refused.headers["x-ratelimit-limit-tokens"] == "100"
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) in (40, 41)
    assert 0 < int(refused.headers["retry-after-ms"]) <= 6100  # 10 tokens at 100 a minute
    assert embed(pair[1], key, {"model": MODEL, "input": [ids(30)]}).status_code == 200
    assert (
        int(embed(pair[0], key, {"model": MODEL, "input": [ids(2)]}).headers["x-ratelimit-remaining-tokens"])
        < 15
    )


def test_with_redis_killed_local_serves_from_each_servers_own_buckets_then_shares_again(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    redis = start_redis()
    with (
        caplog.at_level(logging.INFO, logger="embedserve.ratelimit"),
        servers(data_dir, redis.url()) as (a, b),
    ):
        key = create_key([a, b], rpm=4)
        assert [embed(s, key).status_code for s in (a, b, a, b, a)] == [200, 200, 200, 200, 429]
        before = store_errors(a)
        redis.stop()
        # Each server now counts in its own buckets, full at first: 4 each, then 429.
        assert [embed(a, key).status_code for _ in range(5)] == [200, 200, 200, 200, 429]
        assert [embed(b, key).status_code for _ in range(5)] == [200, 200, 200, 200, 429]
        assert store_errors(a) > before and store_errors(b) >= 1
        down = [r for r in caplog.records if r.getMessage().startswith("rate-limit store unreachable: ")]
        assert len(down) == 2, [r.getMessage() for r in down]  # once per server, not per request
        restarted = start_redis(redis.port)
        try:
            wait_for(lambda: sum("answers again" in r.getMessage() for r in caplog.records) == 2)
            # The restarted Redis holds a full bucket: 4 across both servers again.
            assert [embed(s, key).status_code for s in (a, b, a, b, a, b)] == [200, 200, 200, 200, 429, 429]
        finally:
            restarted.stop()


def test_refuse_starts_without_redis_answers_503_for_limited_keys_and_serves_once_it_is_back(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there yet
    with (
        caplog.at_level(logging.INFO, logger="embedserve.ratelimit"),
        servers(data_dir, f"redis://127.0.0.1:{port}/0", count=1, fallback="refuse") as (server,),
    ):
        (line,) = [r.getMessage() for r in caplog.records if r.name == "embedserve.ratelimit"]
        assert line.startswith("rate-limit store unreachable at start-up: ")
        assert "refusing limited keys' requests with 503" in line
        key = create_key([server], rpm=2)
        for _ in range(2):
            refused = embed(server, key)
            error = assert_error(refused, 503, "rate_limit_store_unavailable", "server_error")
            assert "rate-limit store" in error["message"]
            assert 1 <= int(refused.headers["retry-after"]) <= 2
            assert not any(name.startswith("x-ratelimit") for name in refused.headers)
        assert embed(server, STATIC).status_code == 200  # an unlimited key does not need the store
        redis = start_redis(port)
        try:
            wait_for(lambda: any("answers again" in r.getMessage() for r in caplog.records))
            statuses = [embed(server, key).status_code for _ in range(3)]
            assert statuses == [200, 200, 429]  # Redis's bucket, full
        finally:
            redis.stop()


@pytest.mark.parametrize("url", ["redis//127.0.0.1:6379", "http://127.0.0.1:6379/0", "redis://host:6379/db"])
def test_a_malformed_rate_limit_store_stops_serve_with_one_line(tmp_path: Path, url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "embedserve", "serve", "--data-dir", str(tmp_path), "--rate-limit-store", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    expected = "expected redis://HOST[:PORT][/DB] (or rediss:// for TLS)"
    assert result.stderr.splitlines() == [f"embedserve: error: --rate-limit-store {url!r}: {expected}"]
