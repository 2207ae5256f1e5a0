"""Per-key rate limits: token buckets for requests and tokens per minute (pure arithmetic on an injected
clock), a request's token hold from its estimate to its exact count, and OpenAI's x-ratelimit-* headers.
Per process, on the event loop's thread (design notes 17 and 31)."""

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


@dataclass(slots=True)
class TokenHold:
    """Tokens taken from a key's bucket for one request, before and after it is tokenized. `stop_at`:
    tokenization stops once the request passes it (the key's whole limit), when the hold may not
    cover the request; None when it surely does (or the key is unlimited)."""

    principal: Principal
    taken: float = 0.0
    stop_at: int | None = None


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
        """Before any body work: take one request (also for a request that is refused later: its work
        counts). Its tokens are checked once its size is known (`hold_tokens`)."""
        requests = self._bucket(principal, "requests")
        if requests is None:
            return
        wait = requests.wait_s(1)
        assert wait is not None  # capacity >= 1
        if wait > 0:
            raise RateLimitExceeded(
                f"Rate limit reached for requests: this key may send {principal.rpm} requests per "
                f"minute. Retry in {format_duration(wait)}.",
                limit="requests",
                retry_after_s=wait,
            )
        requests.level -= 1

    def hold_tokens(self, principal: Principal, estimate: int) -> TokenHold:
        """Before tokenizing: take `estimate` (an upper bound of the request's tokens) when the bucket
        surely covers it; otherwise take what it holds (so that the key's other requests in flight see
        it gone) and have tokenization stop once the request passes the key's whole limit."""
        bucket = self._bucket(principal, "tokens")
        if bucket is None:
            return TokenHold(principal)
        if estimate <= bucket.level:
            bucket.level -= estimate
            return TokenHold(principal, taken=estimate)
        taken = max(0.0, bucket.level)
        bucket.level -= taken
        return TokenHold(principal, taken=taken, stop_at=int(bucket.capacity))

    def settle(self, hold: TokenHold, count: int) -> None:
        """The request holds exactly `count` tokens: keep exactly those (giving back the rest of the
        estimate), or take what is missing, or refuse it (429, the hold given back)."""
        bucket = self._bucket(hold.principal, "tokens")
        if bucket is None:
            return
        if count <= hold.taken:
            bucket.level = min(bucket.capacity, bucket.level + hold.taken - count)
            hold.taken = count
            return
        self.release(hold)
        self._refuse(hold.principal, bucket, count)
        bucket.level -= count
        hold.taken = count

    def over_limit(self, hold: TokenHold, at_least: int) -> RateLimitExceeded:
        """Tokenization stopped at `hold.stop_at`: the request holds more than the key's whole limit.
        The hold is given back."""
        self.release(hold)
        return self._too_large(hold.principal, at_least, exact=False)

    def meter(self, principal: Principal) -> KeyMeter:
        """One request's meter (service.Meter) on the key's tokens per minute."""
        return KeyMeter(self, principal)

    def release(self, hold: TokenHold) -> None:
        """Give back a request's tokens: it was refused, or the model never embedded them."""
        bucket = self._bucket(hold.principal, "tokens")
        if bucket is not None:
            bucket.level = min(bucket.capacity, bucket.level + hold.taken)
        hold.taken = 0.0

    def _refuse(self, principal: Principal, bucket: Bucket, count: int) -> None:
        """429 unless `count` tokens are in the bucket now."""
        wait = bucket.wait_s(count)
        if wait is None:
            raise self._too_large(principal, count, exact=True)
        if wait > 0:
            raise RateLimitExceeded(
                f"Rate limit reached for tokens: this request needs {count} tokens and this key may use "
                f"{principal.tpm} per minute ({math.floor(bucket.level)} left now). Retry in "
                f"{format_duration(wait)}.",
                limit="tokens",
                retry_after_s=wait,
            )

    @staticmethod
    def _too_large(principal: Principal, count: int, *, exact: bool) -> RateLimitExceeded:
        holds = f"{count}" if exact else f"at least {count}"
        return RateLimitExceeded(
            f"Request too large: it holds {holds} tokens, more than this key's limit of "
            f"{principal.tpm} tokens per minute. Split the input into smaller requests.",
            limit="tokens",
            retry_after_s=None,
        )

    def headers(self, principal: Principal) -> list[tuple[str, str]]:
        """x-ratelimit-{limit,remaining,reset}-{requests,tokens} for each limit the key has."""
        out: list[tuple[str, str]] = []
        for kind in ("requests", "tokens"):
            bucket = self._bucket(principal, kind)
            if bucket is not None:
                out += [
                    (f"x-ratelimit-limit-{kind}", str(int(bucket.capacity))),
                    (f"x-ratelimit-remaining-{kind}", str(math.floor(bucket.level))),
                    (f"x-ratelimit-reset-{kind}", format_duration(bucket.reset_s())),
                ]
        return out


class KeyMeter:
    """service.Meter on a key's token bucket: one request's hold, from its estimate to its exact count."""

    def __init__(self, limiter: RateLimiter, principal: Principal) -> None:
        self._limiter = limiter
        self._hold = TokenHold(principal)

    def hold(self, estimate: int) -> int | None:
        self._hold = self._limiter.hold_tokens(self._hold.principal, estimate)
        return self._hold.stop_at

    def settle(self, tokens: int) -> None:
        self._limiter.settle(self._hold, tokens)

    def over_limit(self, tokens: int) -> RateLimitExceeded:
        return self._limiter.over_limit(self._hold, tokens)

    def release(self) -> None:
        self._limiter.release(self._hold)
