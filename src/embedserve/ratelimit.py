"""Per-key rate limits: a token bucket per key for requests per minute and one for tokens per minute
(pure arithmetic on an injected clock), and OpenAI's x-ratelimit-* headers. Everything runs on the event
loop's thread, so no lock is needed; the limiter lives in AppState, and limits are per process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from embedserve.errors import RateLimitExceeded
from embedserve.types import Principal

Kind = Literal["requests", "tokens"]
WINDOW_S = 60.0  # limits are per minute


@dataclass(slots=True)
class Bucket:
    """Holds up to `capacity` (the per-minute limit) and refills at capacity per minute: a full minute's
    quota may be spent at once, then it comes back steadily."""

    capacity: float
    level: float
    updated: float

    @property
    def rate(self) -> float:
        return self.capacity / WINDOW_S

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def resize(self, capacity: float) -> None:
        """A changed limit keeps what was spent: raising it gives the difference at once."""
        spent = self.capacity - self.level
        self.capacity = capacity
        self.level = max(0.0, capacity - spent)

    def wait_s(self, amount: float) -> float | None:
        """Seconds until `amount` is available (0: now); None when it never will be."""
        if amount > self.capacity:
            return None
        return max(0.0, (amount - self.level) / self.rate)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) / self.rate


def format_duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: `20ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`."""
    ms = math.ceil(max(0.0, seconds) * 1000 - 1e-6)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, Kind], Bucket] = {}

    def _bucket(self, principal: Principal, kind: Kind) -> Bucket | None:
        limit = principal.rpm if kind == "requests" else principal.tpm
        if limit is None:
            return None
        now = self._clock()
        bucket = self._buckets.get((principal.key_id, kind))
        if bucket is None:
            bucket = self._buckets[(principal.key_id, kind)] = Bucket(limit, limit, now)
        elif bucket.capacity != limit:  # the key's limit was changed while the server runs
            bucket.refill(now)
            bucket.resize(limit)
        bucket.refill(now)
        return bucket

    def admit_request(self, principal: Principal) -> None:
        """Before any body work: take one request, and refuse early when the token bucket is empty."""
        requests = self._bucket(principal, "requests")
        if requests is not None:
            wait = requests.wait_s(1)
            assert wait is not None  # capacity >= 1
            if wait > 0:
                raise RateLimitExceeded(
                    f"Rate limit reached for requests: this key may send {principal.rpm} requests per "
                    f"minute. Retry in {format_duration(wait)}.", limit="requests", retry_after_s=wait)
        tokens = self._bucket(principal, "tokens")
        if tokens is not None and tokens.level < 1:
            wait = tokens.wait_s(1) or 0.0
            raise RateLimitExceeded(
                f"Rate limit reached for tokens: this key may use {principal.tpm} tokens per minute. "
                f"Retry in {format_duration(wait)}.", limit="tokens", retry_after_s=wait)
        if requests is not None:
            requests.level -= 1

    def take_tokens(self, principal: Principal, count: int) -> None:
        """Once the request's tokens are counted, before the model runs."""
        tokens = self._bucket(principal, "tokens")
        if tokens is None:
            return
        wait = tokens.wait_s(count)
        if wait is None:
            raise RateLimitExceeded(
                f"Request too large: it holds {count} tokens, more than this key's limit of "
                f"{principal.tpm} tokens per minute. Split the input into smaller requests.",
                limit="tokens", retry_after_s=None)
        if wait > 0:
            raise RateLimitExceeded(
                f"Rate limit reached for tokens: this request needs {count} tokens and this key may use "
                f"{principal.tpm} per minute ({math.floor(tokens.level)} left now). Retry in "
                f"{format_duration(wait)}.", limit="tokens", retry_after_s=wait)
        tokens.level -= count

    def refund_tokens(self, principal: Principal, count: int) -> None:
        """Tokens of a request that failed after taking them (the model never embedded them)."""
        tokens = self._bucket(principal, "tokens")
        if tokens is not None:
            tokens.level = min(tokens.capacity, tokens.level + count)

    def headers(self, principal: Principal) -> list[tuple[str, str]]:
        """x-ratelimit-{limit,remaining,reset}-{requests,tokens} for each limit the key has."""
        out: list[tuple[str, str]] = []
        for kind in ("requests", "tokens"):
            bucket = self._bucket(principal, kind)
            if bucket is not None:
                out += [(f"x-ratelimit-limit-{kind}", str(int(bucket.capacity))),
                        (f"x-ratelimit-remaining-{kind}", str(math.floor(bucket.level))),
                        (f"x-ratelimit-reset-{kind}", format_duration(bucket.reset_s()))]
        return out
