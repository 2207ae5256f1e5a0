"""Per-key rate limits on a bucket store: a request admitted against its key's requests per minute, its
tokens held from an estimate to the exact count (TokenHold, KeyMeter), the 429s that say which limit and
how long to wait, and OpenAI's x-ratelimit-* headers (design notes 17, 31 and 53)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from embedserve.errors import RateLimitExceeded, RateLimitStoreUnavailable
from embedserve.ratelimit.buckets import Kind, Level, Take, format_duration
from embedserve.ratelimit.local import LocalBuckets
from embedserve.types import Principal


class BucketStore(Protocol):
    """Where the buckets live: this process (local.LocalBuckets) or Redis (failover.Failover over
    redis_store.RedisBuckets). Each change is applied at once; the levels come back in order."""

    async def take(self, changes: Sequence[Take]) -> list[Level]: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class TokenHold:
    """Tokens taken from a key's bucket for one request, before and after it is tokenized. `stop_at`:
    tokenization stops once the request passes it (the key's whole limit), when the hold may not
    cover the request; None when it surely does (or the key is unlimited)."""

    principal: Principal
    taken: float = 0.0
    stop_at: int | None = None


def _limit(principal: Principal, kind: Kind) -> int | None:
    return principal.rpm if kind == "requests" else principal.tpm


class RateLimiter:
    def __init__(self, store: BucketStore | None = None) -> None:
        self.store: BucketStore = store or LocalBuckets()

    async def _change(
        self,
        principal: Principal,
        kind: Kind,
        amount: float = 0.0,
        give_back: float = 0.0,
        partial: bool = False,
    ) -> Level | None:
        """One change to the key's bucket of `kind` (buckets.Take); None when the key has no such limit."""
        limit = _limit(principal, kind)
        if limit is None:
            return None
        (level,) = await self.store.take([Take(principal.key_id, kind, limit, amount, give_back, partial)])
        return level

    async def admit_request(self, principal: Principal) -> None:
        """Before any body work: take one request (also for a request that is refused later: its work
        counts). Its tokens are checked once its size is known (`hold_tokens`)."""
        requests = await self._change(principal, "requests", amount=1)
        if requests is None or requests.taken:
            return
        wait = requests.wait_s(1)
        assert wait is not None  # capacity >= 1
        raise RateLimitExceeded(
            f"Rate limit reached for requests: this key may send {principal.rpm} requests per "
            f"minute. Retry in {format_duration(wait)}.",
            limit="requests",
            retry_after_s=wait,
        )

    async def hold_tokens(self, principal: Principal, estimate: int) -> TokenHold:
        """Before tokenizing: take `estimate` (an upper bound of the request's tokens) when the bucket
        surely covers it; otherwise take what it holds (so that the key's other requests in flight see
        it gone) and have tokenization stop once the request passes the key's whole limit."""
        tokens = await self._change(principal, "tokens", amount=estimate, partial=True)
        if tokens is None:
            return TokenHold(principal)
        if tokens.taken >= estimate:
            return TokenHold(principal, taken=estimate)
        return TokenHold(principal, taken=tokens.taken, stop_at=int(tokens.capacity))

    async def settle(self, hold: TokenHold, count: int) -> None:
        """The request holds exactly `count` tokens: keep exactly those (giving back the rest of the
        estimate), or take what is missing, or refuse it (429, the hold given back)."""
        principal = hold.principal
        if count <= hold.taken:
            await self._change(principal, "tokens", give_back=hold.taken - count)
            hold.taken = count
            return
        # The hold back and the exact count taken in one change: no other request sees the gap.
        tokens = await self._change(principal, "tokens", amount=count, give_back=hold.taken)
        hold.taken = 0.0
        if tokens is None:
            return
        if tokens.taken:
            hold.taken = count
            return
        wait = tokens.wait_s(count)
        if wait is None:
            raise self._too_large(principal, count, exact=True)
        raise RateLimitExceeded(
            f"Rate limit reached for tokens: this request needs {count} tokens and this key may use "
            f"{principal.tpm} per minute ({math.floor(tokens.level)} left now). Retry in "
            f"{format_duration(wait)}.",
            limit="tokens",
            retry_after_s=wait,
        )

    async def over_limit(self, hold: TokenHold, at_least: int) -> RateLimitExceeded:
        """Tokenization stopped at `hold.stop_at`: the request holds more than the key's whole limit.
        The hold is given back."""
        await self.release(hold)
        return self._too_large(hold.principal, at_least, exact=False)

    def meter(self, principal: Principal) -> KeyMeter:
        """One request's meter (service.Meter) on the key's tokens per minute."""
        return KeyMeter(self, principal)

    async def release(self, hold: TokenHold) -> None:
        """Give back a request's tokens: it was refused, or the model never embedded them. (With the
        store refusing, nothing can be given back; the refill returns them.)"""
        taken, hold.taken = hold.taken, 0.0
        if taken:
            with contextlib.suppress(RateLimitStoreUnavailable):
                await self._change(hold.principal, "tokens", give_back=taken)

    @staticmethod
    def _too_large(principal: Principal, count: int, *, exact: bool) -> RateLimitExceeded:
        holds = f"{count}" if exact else f"at least {count}"
        return RateLimitExceeded(
            f"Request too large: it holds {holds} tokens, more than this key's limit of "
            f"{principal.tpm} tokens per minute. Split the input into smaller requests.",
            limit="tokens",
            retry_after_s=None,
        )

    async def headers(self, principal: Principal) -> list[tuple[str, str]]:
        """x-ratelimit-{limit,remaining,reset}-{requests,tokens} for each limit the key has (none while
        a refusing store is unreachable)."""
        kinds: list[Kind] = [kind for kind in ("requests", "tokens") if _limit(principal, kind) is not None]
        if not kinds:
            return []
        changes = [Take(principal.key_id, kind, _limit(principal, kind) or 0) for kind in kinds]
        try:
            levels = await self.store.take(changes)
        except RateLimitStoreUnavailable:
            return []
        out: list[tuple[str, str]] = []
        for kind, level in zip(kinds, levels, strict=True):
            out += [
                (f"x-ratelimit-limit-{kind}", str(int(level.capacity))),
                (f"x-ratelimit-remaining-{kind}", str(math.floor(level.level))),
                (f"x-ratelimit-reset-{kind}", format_duration(level.reset_s())),
            ]
        return out

    async def close(self) -> None:
        await self.store.close()


class KeyMeter:
    """service.Meter on a key's token bucket: one request's hold, from its estimate to its exact count."""

    def __init__(self, limiter: RateLimiter, principal: Principal) -> None:
        self._limiter = limiter
        self._hold = TokenHold(principal)

    async def hold(self, estimate: int) -> int | None:
        self._hold = await self._limiter.hold_tokens(self._hold.principal, estimate)
        return self._hold.stop_at

    async def settle(self, tokens: int) -> None:
        await self._limiter.settle(self._hold, tokens)

    async def over_limit(self, tokens: int) -> RateLimitExceeded:
        return await self._limiter.over_limit(self._hold, tokens)

    async def release(self) -> None:
        await self._limiter.release(self._hold)
