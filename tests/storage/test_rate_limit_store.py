"""Rate limits in a real Redis: limiters of two processes (two clients) share a key's buckets exactly,
also under concurrent requests; buckets expire once they would be full; when Redis dies the failover
serves from this process's buckets (`local`) or refuses (`refuse`), logs once, counts every failed call,
and goes back to Redis once it answers again, as at a start-up without it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

import pytest
import redis as sync_redis

from embedserve.errors import RateLimitExceeded, RateLimitStoreUnavailable
from embedserve.ratelimit import RateLimiter
from embedserve.ratelimit.failover import Failover
from embedserve.ratelimit.redis_store import RedisBuckets, parse_store_url
from embedserve.types import Principal
from redis_server import RedisServer, redis_server, start_redis

RECOVERY_S = 15.0  # bound on finding Redis again (the probe backs off to one try every 2 s)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def shared(server: RedisServer, clock: Callable[[], float] | None = None) -> RateLimiter:
    return RateLimiter(RedisBuckets(parse_store_url(server.url()), clock=clock))


def failover(server: RedisServer, fallback: str, errors: list[int]) -> Failover:
    return Failover(
        RedisBuckets(parse_store_url(server.url())),
        fallback=fallback,  # type: ignore[arg-type]
        on_error=lambda: errors.append(1),
    )


async def admitted(limiter: RateLimiter, key: Principal, count: int) -> int:
    return sum(await asyncio.gather(*(admit(limiter, key) for _ in range(count))))


async def admit(limiter: RateLimiter, key: Principal) -> bool:
    try:
        await limiter.admit_request(key)
    except RateLimitExceeded:
        return False
    return True


async def eventually(condition: Callable[[], bool], timeout_s: float = RECOVERY_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_two_processes_limiters_share_a_key_exactly_under_concurrent_requests(redis: RedisServer) -> None:
    key = Principal(key_id="key_shared", rpm=30, tpm=1000)

    async def main() -> None:
        now = 5000.0  # one instant for both: no refill while the requests race
        first, second = shared(redis, lambda: now), shared(redis, lambda: now)
        racing = [first, second] * 50
        results = await asyncio.gather(*(admit(limiter, key) for limiter in racing))
        assert sum(results) == 30  # 30 a minute in all, not 30 each
        holds = await asyncio.gather(*(limiter.hold_tokens(key, 300) for limiter in (first, second) * 2))
        assert sorted(hold.taken for hold in holds) == [100, 300, 300, 300]  # never the same tokens twice
        assert dict(await second.headers(key))["x-ratelimit-remaining-tokens"] == "0"
        await first.close()
        await second.close()

    asyncio.run(main())


def test_buckets_expire_once_they_would_be_full_again(redis: RedisServer) -> None:
    async def main() -> None:
        limiter = shared(redis)
        await limiter.admit_request(Principal(key_id="key_ttl", rpm=60))  # full again in 1 s
        await limiter.close()

    asyncio.run(main())
    client = sync_redis.Redis.from_url(redis.url())
    (name,) = client.keys("*")
    assert name == b"embedserve:ratelimit:{key_ttl}:requests"  # both buckets of a key share a slot
    assert 0 < client.pttl(name) <= 2000  # 1 s to full, plus a second


def test_with_redis_gone_local_serves_from_this_process_logs_once_and_shares_again_when_it_is_back(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    key = Principal(key_id="key_outage", rpm=5)
    errors: list[int] = []

    async def main() -> None:
        store = failover(redis, "local", errors)
        limiter, other = RateLimiter(store), shared(redis)
        await store.start()
        assert await admitted(limiter, key, 3) + await admitted(other, key, 3) == 5  # shared
        redis.stop()
        assert await admitted(limiter, key, 8) == 5  # this process's own, full bucket
        assert not store.shared and len(errors) >= 1
        await other.close()
        restarted = start_redis(redis.port)
        other = shared(restarted)  # another server, started meanwhile
        try:
            await eventually(lambda: store.shared)
            assert await admitted(limiter, key, 3) + await admitted(other, key, 3) == 5  # shared again
        finally:
            await limiter.close()
            await other.close()
            restarted.stop()

    with caplog.at_level(logging.INFO, logger="embedserve.ratelimit"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "embedserve.ratelimit"]
    where = f"redis://127.0.0.1:{redis.port}/0"
    assert len(lines) == 3, lines  # one line for the outage however many requests it met
    assert lines[0] == f"rate limits are shared in {where}"
    assert lines[1].startswith("rate-limit store unreachable: ") and "own buckets" in lines[1]
    assert lines[2].startswith(f"rate-limit store {where} answers again after ")


def test_with_redis_gone_refuse_answers_503_with_retry_after_and_serves_once_it_is_back(
    redis: RedisServer,
) -> None:
    key = Principal(key_id="key_refused", rpm=100, tpm=1000)
    errors: list[int] = []

    async def main() -> None:
        store = failover(redis, "refuse", errors)
        limiter = RateLimiter(store)
        await store.start()
        await limiter.admit_request(key)
        hold = await limiter.hold_tokens(key, 10)
        redis.stop()
        with pytest.raises(RateLimitStoreUnavailable) as refused:
            await limiter.admit_request(key)
        assert refused.value.status == 503 and refused.value.code == "rate_limit_store_unavailable"
        assert 1 <= refused.value.retry_after_s <= 2
        await limiter.release(hold)  # nothing to give back to: no error
        assert await limiter.headers(key) == []  # unknown while the store is away
        await limiter.admit_request(Principal(key_id="key_unlimited"))  # unlimited keys never ask it
        restarted = start_redis(redis.port)
        try:
            await eventually(lambda: store.shared)
            await limiter.admit_request(key)
            assert dict(await limiter.headers(key))["x-ratelimit-remaining-requests"] == "99"
        finally:
            await limiter.close()
            restarted.stop()

    asyncio.run(main())
    assert len(errors) >= 1  # the call that found the outage (and each failed probe)


def test_a_store_down_at_start_up_is_logged_as_such_and_joined_when_it_comes(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = redis.port
    redis.stop()
    key = Principal(key_id="key_late", rpm=2)

    async def main() -> None:
        store = Failover(RedisBuckets(parse_store_url(f"redis://127.0.0.1:{port}/0")), fallback="local")
        limiter = RateLimiter(store)
        await store.start()
        assert not store.shared
        assert await admitted(limiter, key, 3) == 2
        late = start_redis(port)
        try:
            await eventually(lambda: store.shared)
            assert await admitted(limiter, key, 3) == 2  # Redis's bucket, full
        finally:
            await limiter.close()
            late.stop()

    with caplog.at_level(logging.WARNING, logger="embedserve.ratelimit"):
        asyncio.run(main())
    (line,) = [r.getMessage() for r in caplog.records if r.name == "embedserve.ratelimit"]
    assert line.startswith("rate-limit store unreachable at start-up: ")
