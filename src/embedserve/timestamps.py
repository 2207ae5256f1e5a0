"""Timestamps at the edges: the database keeps unix seconds; people and JSON see ISO 8601 in UTC
(`2025-01-31T12:00:00Z`), and give a date or a date-time (a bare date is 00:00 UTC, no offset is UTC).
Every time accepted lies in 1970..9999 UTC; every stored time renders, whatever float it is."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from embedserve.errors import InvalidRequest

_RELATIVE = re.compile(r"^([0-9]+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIRST = datetime.min.replace(tzinfo=UTC)  # 0001-01-01T00:00:00Z
_LAST = datetime.max.replace(microsecond=0, tzinfo=UTC)  # 9999-12-31T23:59:59Z

#: What a client may give (unix seconds, `EARLIEST <= t < END`): 1970-01-01T00:00:00Z up to the last
#: second of 9999, the last year ISO 8601's four digits and Python's datetime can write.
EARLIEST = 0.0
END = 253402300800.0  # 10000-01-01T00:00:00Z
_SPAN = timedelta(seconds=END)
RANGE = "1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z"
#: What renders as itself (`RENDERED_START <= t < END`, the years 1..9999); beyond, the nearest end.
RENDERED_START = -62135596800.0  # 0001-01-01T00:00:00Z


def _utc(ts: float) -> datetime | None:
    """`ts` floored to the second as a UTC datetime. Total: beyond datetime's years 1..9999 (a row
    written by hand or by an older version) it is the nearest end of that range, NaN is None."""
    if math.isnan(ts):
        return None
    try:
        return _EPOCH + timedelta(seconds=math.floor(ts))
    except OverflowError:  # +-inf, or past year 1 / 9999
        return _LAST if ts > 0 else _FIRST


def iso(ts: float | None) -> str | None:
    """`2025-01-31T12:00:00Z`; None for None (and for a NaN). Never raises."""
    moment = None if ts is None else _utc(ts)
    return None if moment is None else moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(value: object, param: str, *, now: float | None = None, relative: bool = False) -> float:
    """`2025-01-31`, `2025-01-31T12:00`, `2025-01-31T12:00:00+02:00`, `...Z` -> unix seconds. With
    `relative`, also `30d`, `12h`, `15m`, `45s` from `now`. InvalidRequest naming `param` otherwise,
    and for a time outside RANGE (so every accepted time can be written back)."""
    if isinstance(value, str):
        text = value.strip()
        match = _RELATIVE.match(text) if relative else None
        if match is not None:
            base = datetime.now(UTC).timestamp() if now is None else now
            digits, unit = match.groups()
            # (a count of more digits than any in range is out of range, and int() of thousands of
            # digits would raise rather than answer)
            ts = base + int(digits) * _UNITS[unit] if len(digits) <= 15 else math.inf
            if not EARLIEST <= ts < END:
                raise _out_of_range(value, param)
            return ts
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            # (compared exactly: as a float, the last microsecond of 9999 rounds up to END)
            if not timedelta(0) <= parsed - _EPOCH < _SPAN:
                raise _out_of_range(value, param)
            return parsed.timestamp()
    hint = " or a duration from now such as 30d, 12h" if relative else ""
    raise InvalidRequest(
        f"'{param}' must be a date (2025-01-31) or an ISO 8601 date-time "
        f"(2025-01-31T12:00:00Z){hint}; got {value!r}.",
        param=param,
    )


def _out_of_range(value: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}' must be a time from {RANGE} (UTC); got {value!r}.", param=param)
