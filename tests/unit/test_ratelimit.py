"""Token-bucket rate limits on an injected clock: a full minute's quota at once, then a steady refill;
429s that say which limit and how long to wait; OpenAI's header set and duration format. Every behaviour
is the same on this process's buckets and on buckets in a real Redis (its Lua script, the same clock)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis as sync_redis

from embedserve.errors import ConfigError, RateLimitExceeded
from embedserve.ratelimit import (
    Bucket,
    Level,
    LocalBuckets,
    RateLimiter,
    Take,
    TokenHold,
    backoff_s,
    format_duration,
)
from embedserve.ratelimit.redis_store import RedisBuckets, parse_store_url
from embedserve.types import Principal
from redis_server import RedisServer, redis_server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


Scenario = Callable[[RateLimiter], Awaitable[None]]


@pytest.fixture(params=["local", "redis"])
def on_store(request: pytest.FixtureRequest, clock: Clock) -> Callable[[Scenario], None]:
    """Runs a scenario on a limiter over the store of the parameter, on the test's clock."""

    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        url = server.url(db=1)
        sync_redis.Redis.from_url(url).flushdb()  # each test starts with no buckets

    def run(scenario: Scenario) -> None:
        async def main() -> None:
            if request.param == "local":
                limiter = RateLimiter(LocalBuckets(clock))
            else:
                limiter = RateLimiter(RedisBuckets(parse_store_url(url), clock=clock))
            try:
                await scenario(limiter)
            finally:
                await limiter.close()

        asyncio.run(main())

    return run


def limited(rpm: int | None = None, tpm: int | None = None, key: str = "key_a") -> Principal:
    return Principal(key_id=key, rpm=rpm, tpm=tpm)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.0004, "1ms"),
        (0.02, "20ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.9984, "59.999s"),
        (59.9994, "1m0s"),
        (60, "1m0s"),
        (90.5, "1m30.5s"),
        (360, "6m0s"),
        (3723, "1h2m3s"),
    ],
)
def test_durations_are_written_as_openai_writes_its_reset_headers(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_a_bucket_starts_full_and_refills_at_its_limit_per_minute() -> None:
    bucket = Bucket(capacity=60, level=60, updated=0)
    bucket.level = 0
    bucket.refill(1.0)
    assert bucket.level == pytest.approx(1.0)
    bucket.refill(1000.0)
    assert bucket.level == 60  # never above the limit
    assert bucket.wait_s(61) is None  # more than the limit: never


def test_a_full_minute_of_requests_may_be_spent_at_once_then_one_per_refill(
    on_store: Callable[[Scenario], None], clock: Clock
) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        key = limited(rpm=3)
        for _ in range(3):
            await limiter.admit_request(key)
        with pytest.raises(RateLimitExceeded) as refused:
            await limiter.admit_request(key)
        assert refused.value.type == "requests"
        assert refused.value.code == "rate_limit_exceeded"
        assert refused.value.retry_after_s == pytest.approx(20.0)  # 3 per minute: one every 20 s
        clock.now += 19.9
        with pytest.raises(RateLimitExceeded):
            await limiter.admit_request(key)
        clock.now += 0.1
        await limiter.admit_request(key)

    on_store(scenario)


async def take(limiter: RateLimiter, key: Principal, count: int, estimate: int | None = None) -> TokenHold:
    """A request of `count` tokens as the service runs it: held from its estimate, then settled."""
    hold = await limiter.hold_tokens(key, count if estimate is None else estimate)
    await limiter.settle(hold, count)
    return hold


async def remaining_tokens(limiter: RateLimiter, key: Principal) -> str:
    return dict(await limiter.headers(key))["x-ratelimit-remaining-tokens"]


def test_tokens_are_held_from_the_estimate_then_settled_to_the_exact_count(
    on_store: Callable[[Scenario], None],
) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        key = limited(tpm=600)
        hold = await limiter.hold_tokens(key, 400)  # surely fits: taken before tokenizing, no stop
        assert (hold.taken, hold.stop_at) == (400, None)
        assert await remaining_tokens(limiter, key) == "200"
        await limiter.settle(hold, 90)  # the exact count: the rest of the estimate comes back
        assert hold.taken == 90
        assert await remaining_tokens(limiter, key) == "510"

    on_store(scenario)


def test_a_short_bucket_says_how_long_to_wait_for_the_exact_count(
    on_store: Callable[[Scenario], None], clock: Clock
) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        key = limited(tpm=600)  # 10 tokens per second
        await take(limiter, key, 590)
        hold = await limiter.hold_tokens(key, 5000)  # may not fit: takes what is left, stops past the limit
        assert (hold.taken, hold.stop_at) == (pytest.approx(10), 600)
        with pytest.raises(RateLimitExceeded) as refused:
            await limiter.settle(hold, 20)
        assert refused.value.type == "tokens"
        assert refused.value.retry_after_s == pytest.approx(1.0)
        assert "20 tokens" in refused.value.message and "600" in refused.value.message
        assert hold.taken == 0 and await remaining_tokens(limiter, key) == "10"
        clock.now += 1.0
        await take(limiter, key, 20, estimate=5000)

    on_store(scenario)


def test_concurrent_requests_of_a_key_cannot_hold_the_same_tokens(
    on_store: Callable[[Scenario], None],
) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        key = limited(tpm=100)
        first = await limiter.hold_tokens(key, 80)
        second = await limiter.hold_tokens(key, 80)  # only 20 are left for it
        assert first.taken == 80 and second.taken == pytest.approx(20) and second.stop_at == 100
        await limiter.release(first)
        await limiter.settle(second, 15)
        assert await remaining_tokens(limiter, key) == "85"

    on_store(scenario)


def test_an_empty_token_bucket_does_not_refuse_before_the_request_is_known(
    on_store: Callable[[Scenario], None],
) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        key = limited(rpm=10, tpm=60)
        await take(limiter, key, 60)
        await limiter.admit_request(key)  # its size decides: a request too large for the key is told so
        with pytest.raises(RateLimitExceeded) as refused:
            await take(limiter, key, 61)
        assert refused.value.headers() == {"x-should-retry": "false"}

    on_store(scenario)


def test_a_request_larger_than_the_whole_limit_is_refused_without_a_retry_hint(
    on_store: Callable[[Scenario], None],
) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        key = limited(tpm=100)
        with pytest.raises(RateLimitExceeded) as refused:
            await take(limiter, key, 101)
        assert refused.value.retry_after_s is None
        assert refused.value.headers() == {"x-should-retry": "false"}
        assert "Split" in refused.value.message
        await take(limiter, key, 100)  # nothing was taken by the refusal

    on_store(scenario)


def test_tokenization_stopped_past_the_limit_is_too_large_and_gives_the_hold_back(
    on_store: Callable[[Scenario], None],
) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        key = limited(tpm=100)
        await take(limiter, key, 30)
        hold = await limiter.hold_tokens(key, 10_000)
        refused = await limiter.over_limit(hold, 101)
        assert refused.headers() == {"x-should-retry": "false"}
        assert "at least 101 tokens" in refused.message
        assert await remaining_tokens(limiter, key) == "70"

    on_store(scenario)


def test_released_tokens_come_back_but_never_above_the_limit(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        key = limited(tpm=100)
        hold = await take(limiter, key, 80)
        await limiter.release(hold)
        await limiter.release(hold)
        assert await remaining_tokens(limiter, key) == "100"

    on_store(scenario)


def test_keys_have_buckets_of_their_own(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        await limiter.admit_request(limited(rpm=1, key="a"))
        await limiter.admit_request(limited(rpm=1, key="b"))
        with pytest.raises(RateLimitExceeded):
            await limiter.admit_request(limited(rpm=1, key="a"))

    on_store(scenario)


def test_unlimited_keys_are_never_refused_and_get_no_headers(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        key = limited()
        for _ in range(10_000):
            await limiter.admit_request(key)
        await take(limiter, key, 10**9)
        assert await limiter.headers(key) == []

    on_store(scenario)


def test_headers_give_limit_remaining_and_time_to_full_for_each_limit_the_key_has(
    on_store: Callable[[Scenario], None],
) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        key = limited(rpm=60, tpm=6000)
        await limiter.admit_request(key)
        await take(limiter, key, 1500)
        assert dict(await limiter.headers(key)) == {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "6000",
            "x-ratelimit-remaining-tokens": "4500",
            "x-ratelimit-reset-tokens": "15s",
        }
        only_requests = limited(rpm=5, key="r")
        assert [name for name, _ in await limiter.headers(only_requests)] == [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ]

    on_store(scenario)


def test_a_changed_limit_keeps_what_was_spent(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(limiter: RateLimiter) -> None:
        await take(limiter, limited(tpm=100), 60)
        raised = limited(tpm=1000)
        assert await remaining_tokens(limiter, raised) == "940"
        lowered = limited(tpm=50)
        assert await remaining_tokens(limiter, lowered) == "0"
        with pytest.raises(RateLimitExceeded):
            await take(limiter, lowered, 1)

    on_store(scenario)


# ---- the pure parts: one change to a bucket, the store's URL, the probe's backoff --------------------


@pytest.mark.parametrize(
    ("level", "change", "taken", "after"),
    [
        (10.0, Take("k", "tokens", 10, amount=4), 4, 6),  # held whole
        (3.0, Take("k", "tokens", 10, amount=4), 0, 3),  # not there: nothing taken
        (3.0, Take("k", "tokens", 10, amount=4, partial=True), 3, 0),  # partial: what is there
        (3.0, Take("k", "tokens", 10, amount=4, give_back=2), 4, 1),  # given back first, then taken
        (9.0, Take("k", "tokens", 10, give_back=5), 0, 10),  # never above the capacity
        (0.0, Take("k", "tokens", 10, amount=11, partial=True), 0, 0),  # more than the capacity
    ],
)
def test_one_change_gives_back_then_takes_whole_or_partly(
    level: float, change: Take, taken: float, after: float
) -> None:
    bucket = Bucket(capacity=10, level=level, updated=5.0)
    result = bucket.apply(change, now=5.0)
    assert (result.taken, result.level, result.capacity) == (taken, after, 10)


def test_a_change_with_another_limit_refills_at_the_old_rate_then_resizes() -> None:
    bucket = Bucket(capacity=60, level=0, updated=0.0)
    result = bucket.apply(Take("k", "requests", 120), now=30.0)  # 30 s at 1/s: 30 back, 30 spent
    assert (result.capacity, result.level) == (120, 90)


def test_a_clock_that_goes_back_never_refills_twice() -> None:
    bucket = Bucket(capacity=60, level=0, updated=100.0)
    bucket.apply(Take("k", "requests", 60), now=90.0)
    assert bucket.level == 0 and bucket.updated == 100.0
    assert bucket.apply(Take("k", "requests", 60), now=101.0).level == pytest.approx(1.0)


def test_a_level_knows_its_wait_and_its_time_to_full() -> None:
    level = Level(taken=0, level=15, capacity=60)
    assert (level.wait_s(20), level.wait_s(10), level.wait_s(61)) == (5.0, 0.0, None)
    assert level.reset_s() == 45.0


def test_the_probe_of_a_dead_store_backs_off_doubling_to_two_seconds() -> None:
    assert [backoff_s(n) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://cache.internal", "redis://cache.internal:6379/0"),
        ("redis://cache:7000/3", "redis://cache:7000/3"),
        ("rediss://:s3cret@cache:6380/1", "rediss://cache:6380/1"),
        ("redis://user:s3cret@[::1]:6379", "redis://[::1]:6379/0"),
    ],
)
def test_a_store_url_is_read_and_shown_without_its_password(url: str, shown: str) -> None:
    address = parse_store_url(url)
    assert address.shown == shown and address.url == url


@pytest.mark.parametrize(
    "url",
    [
        "redis//127.0.0.1:6379",
        "http://127.0.0.1:6379/0",
        "127.0.0.1:6379",
        "redis://",
        "redis://host:notaport/0",
        "redis://host:99999/0",
        "redis://host:0/0",
        "redis://host:6379/zero",
        "redis://host:6379/0/1",
        "redis://host:6379/0?socket_timeout=5",
        "redis://:s3cret@host:port/0",
    ],
)
def test_a_malformed_store_url_is_one_config_error_that_never_shows_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_store_url(url)
    message = refused.value.message
    assert message.startswith("--rate-limit-store ") and "\n" not in message
    assert "expected redis://HOST[:PORT][/DB]" in message
    assert "s3cret" not in message
