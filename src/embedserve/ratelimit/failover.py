"""A shared store with its outages: while Redis answers every change goes there; when a call fails the
outage begins (logged once, counted), changes go to this process's own buckets (`local`) or are
refused (`refuse`, 503), and a probe with backoff finds Redis again (logged once more)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from embedserve.errors import RateLimitStoreUnavailable
from embedserve.ratelimit.buckets import Level, Take, backoff_s
from embedserve.ratelimit.local import LocalBuckets

log = logging.getLogger("embedserve.ratelimit")

Fallback = Literal["local", "refuse"]


class SharedStore(Protocol):
    """What Failover needs of the shared buckets (redis_store.RedisBuckets)."""

    @property
    def where(self) -> str: ...

    async def take(self, changes: Sequence[Take]) -> list[Level]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class Failover:
    def __init__(
        self,
        shared: SharedStore,
        *,
        fallback: Fallback,
        on_error: Callable[[], None] = lambda: None,
        local: LocalBuckets | None = None,
    ) -> None:
        """`on_error`: called for every failed call to the shared store (the metric)."""
        self._shared = shared
        self._fallback = fallback
        self._on_error = on_error
        self._local = local or LocalBuckets()
        self._down_since: float | None = None
        self._next_probe = 0.0  # monotonic
        self._probe: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        """Whether changes go to the shared store now (False during an outage)."""
        return self._down_since is None

    async def start(self) -> None:
        """At start-up: one call, so that a store down from the start is logged as such (the server
        starts anyway)."""
        try:
            await self._shared.ping()
        except RateLimitStoreUnavailable as exc:
            self._lost(exc, starting=True)
        else:
            log.info("rate limits are shared in %s", self._shared.where)

    async def take(self, changes: Sequence[Take]) -> list[Level]:
        if self._down_since is None:
            try:
                return await self._shared.take(changes)
            except RateLimitStoreUnavailable as exc:
                self._lost(exc)
        if self._fallback == "refuse":
            wait = max(1, math.ceil(self._next_probe - time.monotonic()))
            raise RateLimitStoreUnavailable(
                "The rate-limit store cannot be reached, and this server refuses requests of limited "
                "keys until it can (--rate-limit-fallback refuse).",
                retry_after_s=wait,
            )
        return await self._local.take(changes)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self._shared.close()

    def _lost(self, exc: RateLimitStoreUnavailable, *, starting: bool = False) -> None:
        self._on_error()
        if self._down_since is not None:  # another request found the same outage
            return
        self._down_since = time.monotonic()
        self._next_probe = self._down_since + backoff_s(1)
        then = (
            "serving with this process's own buckets until it answers (--rate-limit-fallback local)"
            if self._fallback == "local"
            else "refusing limited keys' requests with 503 until it answers (--rate-limit-fallback refuse)"
        )
        log.warning(
            "rate-limit store unreachable%s: %s; %s",
            " at start-up" if starting else "",
            exc.message,
            then,
            extra={"event": "rate_limit_store_down", "store": self._shared.where},
        )
        self._probe = asyncio.get_running_loop().create_task(self._recover(), name="probe-rate-limit-store")

    async def _recover(self) -> None:
        """Probe the store with backoff (never hammering a dead one) until it answers."""
        failures = 1
        while True:
            await asyncio.sleep(max(0.0, self._next_probe - time.monotonic()))
            try:
                await self._shared.ping()
            except RateLimitStoreUnavailable:
                self._on_error()
                failures += 1
                self._next_probe = time.monotonic() + backoff_s(failures)
                continue
            down_s = time.monotonic() - (self._down_since or time.monotonic())
            self._down_since, self._probe = None, None
            log.info(
                "rate-limit store %s answers again after %.1f s: rate limits are shared again",
                self._shared.where,
                down_s,
                extra={"event": "rate_limit_store_up", "store": self._shared.where},
            )
            return
