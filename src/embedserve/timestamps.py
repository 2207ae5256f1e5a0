"""Timestamps at the edges: the database keeps unix seconds; people and JSON see ISO 8601 in UTC
(`2025-01-31T12:00:00Z`), and give a date or a date-time (a bare date is 00:00 UTC, no offset is UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from embedserve.errors import InvalidRequest

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def parse_time(value: object, param: str, *, now: float | None = None,
               relative: bool = False) -> float:
    """`2025-01-31`, `2025-01-31T12:00`, `2025-01-31T12:00:00+02:00`, `...Z` -> unix seconds. With
    `relative`, also `30d`, `12h`, `15m`, `45s` from `now`. InvalidRequest naming `param` otherwise."""
    if isinstance(value, str):
        text = value.strip()
        match = _RELATIVE.match(text) if relative else None
        if match is not None:
            base = datetime.now(UTC).timestamp() if now is None else now
            return base + int(match.group(1)) * _UNITS[match.group(2)]
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return parsed.timestamp()
    hint = " or a duration from now such as 30d, 12h" if relative else ""
    raise InvalidRequest(f"'{param}' must be a date (2025-01-31) or an ISO 8601 date-time "
                         f"(2025-01-31T12:00:00Z){hint}; got {value!r}.", param=param)



