"""Token buckets, pure arithmetic on a given time: a bucket's refill, resize and waits, the one change
every limiter operation makes to it (`Bucket.apply`), and OpenAI's duration format for the headers.
Redis runs the same arithmetic in Lua (redis_store.TAKE_LUA)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Kind = Literal["requests", "tokens"]
WINDOW_S = 60.0  # limits are per minute


@dataclass(frozen=True, slots=True)
class Take:
    """One change to one key's bucket, applied at once: give back `give_back` (capped at the bucket's
    capacity), then take `amount` if the bucket holds it; `partial`: otherwise take what it holds."""

    key_id: str
    kind: Kind
    limit: int
    amount: float = 0.0
    give_back: float = 0.0
    partial: bool = False


@dataclass(frozen=True, slots=True)
class Level:
    """What a change took, and the bucket after it."""

    taken: float
    level: float
    capacity: float

    @property
    def rate(self) -> float:
        return self.capacity / WINDOW_S

    def wait_s(self, amount: float) -> float | None:
        """Seconds until `amount` is available (0: now); None when it never will be."""
        if amount > self.capacity:
            return None
        return max(0.0, (amount - self.level) / self.rate)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) / self.rate


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
        return self.snapshot().wait_s(amount)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return self.snapshot().reset_s()

    def snapshot(self, taken: float = 0.0) -> Level:
        return Level(taken=taken, level=self.level, capacity=self.capacity)

    def apply(self, change: Take, now: float) -> Level:
        """`change` at `now`, after the refill (and the resize, when the key's limit changed while the
        server ran)."""
        if self.capacity != change.limit:
            self.refill(now)
            self.resize(change.limit)
        self.refill(now)
        self.level = min(self.capacity, self.level + change.give_back)
        if change.amount <= self.level:
            taken = change.amount
        elif change.partial:
            taken = max(0.0, self.level)
        else:
            taken = 0.0
        self.level -= taken
        return self.snapshot(taken)


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


def backoff_s(failures: int, *, first_s: float = 0.25, most_s: float = 2.0) -> float:
    """The wait before the next probe of a store that failed `failures` times in a row: doubling from
    `first_s`, at most `most_s`."""
    return min(most_s, first_s * 2.0 ** max(0, failures - 1))
