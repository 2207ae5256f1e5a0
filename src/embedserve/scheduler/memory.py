"""Memory as admitted work: the fitted peak of a forward pass of `rows` inputs of `length` tokens, and
the budget the passes running at once share (`--max-batch-memory`; design note 32)."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

#: Measured peaks are raised by this much: the allocator's rounding, a pass's neighbours on the heap.
SAFETY = 1.25
#: The default budget's share of the memory available once the weights are loaded.
DEFAULT_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """Peak bytes of a pass above the process's level before it: per_token * rows * length
    + per_square * rows * length**2."""

    per_token: float = 0.0
    per_square: float = 0.0

    def peak(self, rows: int, length: int) -> float:
        return rows * length * (self.per_token + self.per_square * length)

    def rows_that_fit(self, length: int, room: float) -> int:
        """How many rows of `length` fit `room` bytes (a large number when a row costs nothing)."""
        row = self.peak(1, length)
        return 1 << 30 if row <= 0 else max(0, int(room // row))

    def longest_that_fits(self, room: float) -> int:
        """The longest single input whose pass fits `room` bytes."""
        a, b = self.per_token, self.per_square
        if b <= 0:
            return 1 << 30 if a <= 0 else max(0, int(room // a))
        return max(0, math.floor((-a + math.sqrt(a * a + 4 * b * room)) / (2 * b)))

    def at_least(self, floor: MemoryModel) -> MemoryModel:
        return MemoryModel(max(self.per_token, floor.per_token), max(self.per_square, floor.per_square))


def fit(samples: Sequence[tuple[int, int, float]], floor: MemoryModel = MemoryModel()) -> MemoryModel:
    """Pure: the model through measured (rows, length, peak bytes) samples (least squares on the two
    terms, negative coefficients clipped), raised by SAFETY, never below `floor` (what the shapes
    alone say a pass must hold, which guards against a measurement that saw memory already free in
    the heap)."""
    # peak / rows = a * length + b * length**2: solve the 2x2 normal equations.
    s11 = s12 = s22 = y1 = y2 = 0.0
    for rows, length, peak in samples:
        x1, x2, y = float(length), float(length) ** 2, peak / max(rows, 1)
        s11, s12, s22, y1, y2 = s11 + x1 * x1, s12 + x1 * x2, s22 + x2 * x2, y1 + x1 * y, y2 + x2 * y
    det = s11 * s22 - s12 * s12
    if samples and abs(det) > 1e-9 * s11 * s22:
        a, b = (y1 * s22 - y2 * s12) / det, (s11 * y2 - s12 * y1) / det
        if b < 0:  # no quadratic growth seen: all linear
            a, b = y1 / s11, 0.0
        elif a < 0:
            a, b = 0.0, y2 / s22
    elif samples:
        a, b = y1 / s11 if s11 else 0.0, 0.0
    else:
        a = b = 0.0
    return MemoryModel(max(a, 0.0) * SAFETY, max(b, 0.0) * SAFETY).at_least(floor)


class MemoryBudget:
    """Bytes that the forward passes running at once may hold (one budget per device, shared by the
    models on it). A batcher thread reserves a pass's estimated peak before it runs and releases it
    after; batchers waiting for room are woken when some is released."""

    def __init__(self, capacity: float | None, *, explicit: bool) -> None:
        self.capacity = math.inf if capacity is None else capacity
        self.explicit = explicit  # set by the operator: never lowered to the machine's share
        self._in_use = 0.0
        self._lock = threading.Lock()
        self._waiters: list[threading.Condition] = []

    @property
    def in_use(self) -> float:
        return self._in_use

    def room(self) -> float:
        return self.capacity - self._in_use

    def cap_to(self, capacity: float) -> None:
        """A default budget follows the memory left as models load (explicit ones stay as set)."""
        if not self.explicit:
            self.capacity = min(self.capacity, capacity)

    def watch(self, cond: threading.Condition) -> None:
        with self._lock:
            self._waiters.append(cond)

    def try_reserve(self, amount: float) -> bool:
        """Take `amount` if it fits what is left now (a batch packed to an earlier `room()` may find
        that another model's pass took some meanwhile: it packs again)."""
        with self._lock:
            if amount > self.capacity - self._in_use and self._in_use > 0:
                return False
            self._in_use += amount
            return True

    def release(self, amount: float) -> None:
        with self._lock:
            self._in_use = max(0.0, self._in_use - amount)
            waiters = list(self._waiters)
        for cond in waiters:  # never under our lock: a batcher holds its own lock when it reserves
            with cond:
                cond.notify_all()
