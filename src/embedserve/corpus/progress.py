"""Progress when stderr is not a terminal: a plain line every few seconds (rows, rate, ETA), from
pure formatting functions. (On a terminal the command shows a tqdm bar instead.)"""

from __future__ import annotations

import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """Pure: 42s, 3m05s, 2h03m."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def progress_line(rows: int, total: int | None, tokens: int, elapsed: float) -> str:
    """Pure: `12,000/50,000 rows (24%), 410 rows/s, 9,871 tokens/s, ETA 1m33s` (no total: no share,
    no ETA)."""
    rate = rows / elapsed if elapsed > 0 else 0.0
    done = f"{rows:,} rows"
    eta = ""
    if total:
        done = f"{rows:,}/{total:,} rows ({min(100, 100 * rows // total)}%)"
        if rate > 0 and total > rows:
            eta = f", ETA {duration((total - rows) / rate)}"
    token_rate = tokens / elapsed if elapsed > 0 else 0.0
    return f"{done}, {rate:,.0f} rows/s, {token_rate:,.0f} tokens/s{eta}"


class LineProgress:
    """A progress line through `emit` at most every `every_s` seconds. `total`: the rows to embed,
    where known (set once counted)."""

    def __init__(
        self,
        emit: Callable[[str], None],
        every_s: float,
        total: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self._emit = emit
        self._every_s = every_s
        self._clock = clock
        self._started = clock()
        self._last = self._started
        self.rows = 0
        self.tokens = 0

    def update(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        now = self._clock()
        if now - self._last >= self._every_s:
            self._last = now
            self._emit(progress_line(self.rows, self.total, self.tokens, now - self._started))
