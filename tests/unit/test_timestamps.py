"""Timestamps: every time accepted lies in 1970..9999 UTC (anything else is a 400 naming the field and
the range, never a stored value that cannot be shown), and every stored float renders without raising,
out-of-range ones as the nearest end of the years 1..9999 and NaN as null."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedserve.errors import InvalidRequest
from embedserve.timestamps import END, RANGE, RENDERED_START, iso, parse_time

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
NOW = 1_750_000_000.0  # 2025-06-15


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1970-01-01", "1970-01-01T00:00:00Z"),
        ("1970-01-01T02:00:00+02:00", "1970-01-01T00:00:00Z"),
        ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59Z"),
        ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59Z"),
        ("9999-12-31T23:59:59+00:00", "9999-12-31T23:59:59Z"),
        ("9999-12-31", "9999-12-31T00:00:00Z"),
        ("2025-01-31T14:30:00+02:00", "2025-01-31T12:30:00Z"),
    ],
)
def test_times_inside_the_range_are_accepted_and_render_back(text: str, expected: str) -> None:
    assert iso(parse_time(text, "since")) == expected


@pytest.mark.parametrize(
    "text",
    [
        "9999-12-31T23:00:00-05:00",  # 10000-01-01T04:00Z
        "9999-12-31T23:59:59-12:00",
        "9999-12-31T23:59:59.5-00:01",
        "0001-01-01T00:00:00+14:00",  # year 0 in UTC
        "0001-01-01",
        "1969-12-31T23:59:59Z",
        "1970-01-01T00:00:00+00:01",
    ],
)
def test_times_outside_1970_to_9999_utc_are_400_naming_the_field_and_the_range(text: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_time(text, "expires_at", relative=True)
    assert (caught.value.status, caught.value.code, caught.value.param) == (
        400,
        "invalid_value",
        "expires_at",
    )
    assert RANGE in caught.value.message and repr(text) in caught.value.message


@pytest.mark.parametrize(
    "text",
    ["99999999999999999999999d", "999999999d", "9" * 5000 + "s", "3000000000000h", "4000000000000000m"],
)
def test_huge_durations_are_400_naming_the_field_and_the_range(text: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_time(text, "expires_at", now=NOW, relative=True)
    assert caught.value.param == "expires_at" and RANGE in caught.value.message


def test_a_duration_is_accepted_up_to_the_last_second_of_9999() -> None:
    last = END - 1
    assert parse_time("9s", "x", now=last - 9, relative=True) == last
    assert iso(parse_time("9s", "x", now=last - 9, relative=True)) == "9999-12-31T23:59:59Z"
    with pytest.raises(InvalidRequest):
        parse_time("10s", "x", now=last - 9, relative=True)
    assert parse_time("0s", "x", now=NOW, relative=True) == NOW


def test_durations_are_ascii_digits_only() -> None:
    with pytest.raises(InvalidRequest, match="must be a date"):
        parse_time("\u0661\u0662d", "x", now=NOW, relative=True)  # Arabic-Indic "12"


@pytest.mark.parametrize(
    ("ts", "rendered"),
    [
        (0.0, "1970-01-01T00:00:00Z"),
        (-1.5, "1969-12-31T23:59:58Z"),  # floored to the second, as every rendering is
        (1738326599.99, "2025-01-31T12:29:59Z"),
        (END - 1, "9999-12-31T23:59:59Z"),
        (END - 1e-4, "9999-12-31T23:59:59Z"),
        (END, "9999-12-31T23:59:59Z"),
        (8.64e27, "9999-12-31T23:59:59Z"),
        (1e308, "9999-12-31T23:59:59Z"),
        (math.inf, "9999-12-31T23:59:59Z"),
        (RENDERED_START, "0001-01-01T00:00:00Z"),
        (RENDERED_START - 1, "0001-01-01T00:00:00Z"),
        (-1e308, "0001-01-01T00:00:00Z"),
        (-math.inf, "0001-01-01T00:00:00Z"),
        (math.nan, None),
        (None, None),
    ],
)
def test_every_stored_float_renders_out_of_range_ones_as_the_nearest_end(
    ts: float | None, rendered: str | None
) -> None:
    assert iso(ts) == rendered


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_iso_never_raises(ts: float) -> None:
    rendered = iso(ts)
    assert (rendered is None) == math.isnan(ts)
    if rendered is not None:
        assert ISO.match(rendered)


@given(
    st.datetimes(
        min_value=datetime(1, 1, 1),
        max_value=datetime(9999, 12, 31, 23, 59, 59),
        timezones=st.just(UTC)
        | st.builds(timezone, st.integers(-1439, 1439).map(lambda m: timedelta(minutes=m))),
    ).map(lambda moment: moment.replace(microsecond=0))
)
def test_any_iso_date_time_is_accepted_exactly_when_its_utc_year_is_1970_to_9999(moment: datetime) -> None:
    text = moment.isoformat()
    offset = moment.utcoffset()
    assert offset is not None
    try:
        utc: datetime | None = moment.replace(tzinfo=None) - offset
    except OverflowError:  # year 0 or 10000 in UTC
        utc = None
    if utc is not None and 1970 <= utc.year <= 9999:
        ts = parse_time(text, "since")
        assert iso(ts) == utc.isoformat() + "Z"
        assert parse_time(iso(ts), "since") == ts
    else:
        with pytest.raises(InvalidRequest):
            parse_time(text, "since")


@given(st.text(max_size=40) | st.from_regex(r"\A[0-9]{1,30}[smhd]\Z"))
def test_any_text_is_a_time_in_range_or_a_400_never_another_error(text: str) -> None:
    outcome: float | InvalidRequest
    try:
        outcome = parse_time(text, "expires_at", now=NOW, relative=True)
    except InvalidRequest as exc:
        outcome = exc
    if isinstance(outcome, InvalidRequest):
        assert outcome.param == "expires_at"
    else:
        assert 0 <= outcome < END
        assert ISO.match(iso(outcome) or "")
