"""This process's own token buckets, one per key and kind, on the event loop's thread: the default store,
and the one a Redis store falls back to while Redis is unreachable."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from embedserve.ratelimit.buckets import Bucket, Kind, Level, Take


class LocalBuckets:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, Kind], Bucket] = {}

    def apply(self, changes: Sequence[Take]) -> list[Level]:
        """Each change at once (nothing awaits between them: no other request sees a bucket half-done)."""
        now = self._clock()
        levels = []
        for change in changes:
            bucket = self._buckets.get((change.key_id, change.kind))
            if bucket is None:
                bucket = self._buckets[(change.key_id, change.kind)] = Bucket(change.limit, change.limit, now)
            levels.append(bucket.apply(change, now))
        return levels

    async def take(self, changes: Sequence[Take]) -> list[Level]:
        return self.apply(changes)

    async def close(self) -> None:
        return None
