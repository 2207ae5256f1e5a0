"""Token-bucket rate limits on an injected clock: a full minute's quota at once, then a steady refill;
429s that say which limit and how long to wait; OpenAI's header set and duration format."""

from __future__ import annotations

import pytest

from embedserve.errors import RateLimitExceeded
from embedserve.ratelimit import Bucket, RateLimiter, TokenHold, format_duration
from embedserve.types import Principal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


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


def test_a_full_minute_of_requests_may_be_spent_at_once_then_one_per_refill(clock: Clock) -> None:
    limiter, key = RateLimiter(clock), limited(rpm=3)
    for _ in range(3):
        limiter.admit_request(key)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.admit_request(key)
    assert refused.value.type == "requests"
    assert refused.value.code == "rate_limit_exceeded"
    assert refused.value.retry_after_s == pytest.approx(20.0)  # 3 per minute: one every 20 s
    clock.now += 19.9
    with pytest.raises(RateLimitExceeded):
        limiter.admit_request(key)
    clock.now += 0.1
    limiter.admit_request(key)


def take(limiter: RateLimiter, key: Principal, count: int, estimate: int | None = None) -> TokenHold:
    """A request of `count` tokens as the service runs it: held from its estimate, then settled."""
    hold = limiter.hold_tokens(key, count if estimate is None else estimate)
    limiter.settle(hold, count)
    return hold


def test_tokens_are_held_from_the_estimate_then_settled_to_the_exact_count(clock: Clock) -> None:
    limiter, key = RateLimiter(clock), limited(tpm=600)
    hold = limiter.hold_tokens(key, 400)  # surely fits: taken before tokenizing, nothing to stop at
    assert (hold.taken, hold.stop_at) == (400, None)
    assert dict(limiter.headers(key))["x-ratelimit-remaining-tokens"] == "200"
    limiter.settle(hold, 90)  # the exact count: the rest of the estimate comes back
    assert hold.taken == 90
    assert dict(limiter.headers(key))["x-ratelimit-remaining-tokens"] == "510"


def test_a_short_bucket_says_how_long_to_wait_for_the_exact_count(clock: Clock) -> None:
    limiter, key = RateLimiter(clock), limited(tpm=600)  # 10 tokens per second
    take(limiter, key, 590)
    hold = limiter.hold_tokens(key, 5000)  # may not fit: takes what is left, stops past the limit
    assert (hold.taken, hold.stop_at) == (pytest.approx(10), 600)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.settle(hold, 20)
    assert refused.value.type == "tokens"
    assert refused.value.retry_after_s == pytest.approx(1.0)
    assert "20 tokens" in refused.value.message and "600" in refused.value.message
    assert hold.taken == 0 and dict(limiter.headers(key))["x-ratelimit-remaining-tokens"] == "10"
    clock.now += 1.0
    take(limiter, key, 20, estimate=5000)


def test_concurrent_requests_of_a_key_cannot_hold_the_same_tokens(clock: Clock) -> None:
    limiter, key = RateLimiter(clock), limited(tpm=100)
    first = limiter.hold_tokens(key, 80)
    second = limiter.hold_tokens(key, 80)  # only 20 are left for it
    assert first.taken == 80 and second.taken == pytest.approx(20) and second.stop_at == 100
    limiter.release(first)
    limiter.settle(second, 15)
    assert dict(limiter.headers(key))["x-ratelimit-remaining-tokens"] == "85"


def test_an_empty_token_bucket_does_not_refuse_before_the_request_is_known(clock: Clock) -> None:
    limiter, key = RateLimiter(clock), limited(rpm=10, tpm=60)
    take(limiter, key, 60)
    limiter.admit_request(key)  # its size decides: a request too large for the key is told so
    with pytest.raises(RateLimitExceeded) as refused:
        take(limiter, key, 61)
    assert refused.value.headers() == {"x-should-retry": "false"}


def test_a_request_larger_than_the_whole_limit_is_refused_without_a_retry_hint(clock: Clock) -> None:
    limiter, key = RateLimiter(clock), limited(tpm=100)
    with pytest.raises(RateLimitExceeded) as refused:
        take(limiter, key, 101)
    assert refused.value.retry_after_s is None
    assert refused.value.headers() == {"x-should-retry": "false"}
    assert "Split" in refused.value.message
    take(limiter, key, 100)  # nothing was taken by the refusal


def test_tokenization_stopped_past_the_limit_is_too_large_and_gives_the_hold_back(clock: Clock) -> None:
    limiter, key = RateLimiter(clock), limited(tpm=100)
    take(limiter, key, 30)
    hold = limiter.hold_tokens(key, 10_000)
    refused = limiter.over_limit(hold, 101)
    assert refused.headers() == {"x-should-retry": "false"}
    assert "at least 101 tokens" in refused.message
    assert dict(limiter.headers(key))["x-ratelimit-remaining-tokens"] == "70"


def test_released_tokens_come_back_but_never_above_the_limit(clock: Clock) -> None:
    limiter, key = RateLimiter(clock), limited(tpm=100)
    hold = take(limiter, key, 80)
    limiter.release(hold)
    limiter.release(hold)
    assert dict(limiter.headers(key))["x-ratelimit-remaining-tokens"] == "100"


def test_keys_have_buckets_of_their_own(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limiter.admit_request(limited(rpm=1, key="a"))
    limiter.admit_request(limited(rpm=1, key="b"))
    with pytest.raises(RateLimitExceeded):
        limiter.admit_request(limited(rpm=1, key="a"))


def test_unlimited_keys_are_never_refused_and_get_no_headers(clock: Clock) -> None:
    limiter, key = RateLimiter(clock), limited()
    for _ in range(10_000):
        limiter.admit_request(key)
    take(limiter, key, 10**9)
    assert limiter.headers(key) == []


def test_headers_give_limit_remaining_and_time_to_full_for_each_limit_the_key_has(clock: Clock) -> None:
    limiter, key = RateLimiter(clock), limited(rpm=60, tpm=6000)
    limiter.admit_request(key)
    take(limiter, key, 1500)
    assert dict(limiter.headers(key)) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "4500",
        "x-ratelimit-reset-tokens": "15s",
    }
    only_requests = limited(rpm=5, key="r")
    assert [name for name, _ in limiter.headers(only_requests)] == [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ]


def test_a_changed_limit_keeps_what_was_spent(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    take(limiter, limited(tpm=100), 60)
    raised = limited(tpm=1000)
    assert dict(limiter.headers(raised))["x-ratelimit-remaining-tokens"] == "940"
    lowered = limited(tpm=50)
    assert dict(limiter.headers(lowered))["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimitExceeded):
        take(limiter, lowered, 1)
