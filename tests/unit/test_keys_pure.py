"""The pure parts of keys and usage: key format and hashing, the pepper file, key fields and usage query
parameters (each bad value a 400 naming it), timestamps, and the usage table."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import pytest

from embedserve.errors import ConfigError, InvalidRequest, MissingParameter
from embedserve.keys import (
    UNSET,
    KeyChanges,
    generate_key,
    key_digest,
    load_pepper,
    parse_key_fields,
)
from embedserve.timestamps import iso, parse_time
from embedserve.usage import UsageQuery, parse_query, render_table

KEY_SHAPE = re.compile(r"^es-[A-Za-z0-9_-]{43}$")


def test_keys_are_es_and_43_random_url_safe_characters_never_twice_the_same() -> None:
    keys = {generate_key() for _ in range(1000)}
    assert len(keys) == 1000
    assert all(KEY_SHAPE.match(key) for key in keys)


def test_the_digest_depends_on_the_pepper() -> None:
    key = generate_key()
    assert key_digest(b"pepper-1", key) == key_digest(b"pepper-1", key)
    assert key_digest(b"pepper-1", key) != key_digest(b"pepper-2", key)
    assert len(key_digest(b"p", key)) == 32


def test_the_pepper_file_is_created_once_with_mode_600(tmp_path: Path) -> None:
    first = load_pepper(None, tmp_path / "data")
    path = tmp_path / "data" / "key-pepper"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 64
    assert load_pepper(None, tmp_path / "data") == first
    assert load_pepper("from-the-setting", tmp_path / "data") == b"from-the-setting"


def test_processes_starting_together_on_a_fresh_data_dir_agree_on_one_pepper(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        peppers = set(pool.map(lambda _: load_pepper(None, tmp_path / "fresh"), range(32)))
    assert len(peppers) == 1
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["key-pepper"]  # no temporary left


def test_an_empty_pepper_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "key-pepper").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_pepper(None, tmp_path)


def test_key_fields_are_parsed_and_absent_ones_stay_unset() -> None:
    fields = parse_key_fields(
        {
            "name": " team-a ",
            "models": ["m1", "m2", "m1"],
            "rpm": 10,
            "tpm": None,
            "expires_at": "2030-01-01",
            "admin": True,
        },
        creating=True,
    )
    assert fields == KeyChanges(
        name="team-a",
        models=("m1", "m2"),
        rpm=10,
        tpm=None,
        expires_at=parse_time("2030-01-01T00:00:00Z", "x"),
        admin=True,
    )
    partial = parse_key_fields({"rpm": 5}, creating=False)
    assert partial.name is UNSET and partial.models is UNSET and partial.rpm == 5


def test_relative_expiry_counts_from_now() -> None:
    fields = parse_key_fields({"name": "n", "expires_at": "30d"}, creating=True)
    assert isinstance(fields.expires_at, float)
    assert abs(fields.expires_at - parse_time("0s", "x", relative=True) - 30 * 86400) < 5


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [
        ({}, "name", "missing_required_parameter"),
        ({"name": ""}, "name", "invalid_type"),
        ({"name": 3}, "name", "invalid_type"),
        ({"name": "n", "models": []}, "models", "invalid_type"),
        ({"name": "n", "models": "m1"}, "models", "invalid_type"),
        ({"name": "n", "models": [""]}, "models", "invalid_type"),
        ({"name": "n", "rpm": 0}, "rpm", "invalid_type"),
        ({"name": "n", "tpm": -5}, "tpm", "invalid_type"),
        ({"name": "n", "rpm": "10"}, "rpm", "invalid_type"),
        ({"name": "n", "rpm": True}, "rpm", "invalid_type"),
        ({"name": "n", "expires_at": "next tuesday"}, "expires_at", "invalid_value"),
        ({"name": "n", "expires_at": 17}, "expires_at", "invalid_value"),
        ({"name": "n", "admin": "yes"}, "admin", "invalid_type"),
        ({"name": "n", "secret": "x"}, "secret", "invalid_value"),
    ],
)
def test_bad_key_fields_are_400_naming_the_field(payload: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_key_fields(payload, creating=True)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.code == code


def test_a_key_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest):
        parse_key_fields(["name"], creating=True)


def test_an_update_needs_no_name_but_a_create_does() -> None:
    assert parse_key_fields({}, creating=False) == KeyChanges()
    with pytest.raises(MissingParameter):
        parse_key_fields({"rpm": 3}, creating=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-01-31", "2025-01-31T00:00:00Z"),
        ("2025-01-31T12:30", "2025-01-31T12:30:00Z"),
        ("2025-01-31T12:30:00Z", "2025-01-31T12:30:00Z"),
        ("2025-01-31T14:30:00+02:00", "2025-01-31T12:30:00Z"),
    ],
)
def test_dates_and_date_times_are_utc_unless_they_say_otherwise(text: str, expected: str) -> None:
    assert iso(parse_time(text, "since")) == expected


def test_usage_query_parameters_are_parsed() -> None:
    query = parse_query(
        {"key": "key_1", "model": "m", "since": "2025-01-01", "until": "2025-02-01", "group_by": "day"}
    )
    assert query == UsageQuery(
        key="key_1",
        model="m",
        since=parse_time("2025-01-01", "s"),
        until=parse_time("2025-02-01", "u"),
        group_by="day",
    )
    assert parse_query({}) == UsageQuery()


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "2025-13-01"}, "until"),
        ({"group_by": "month"}, "group_by"),
        ({"group-by": "key"}, "group-by"),
        ({"key": ""}, "key"),
        ({"since": "2025-02-01", "until": "2025-01-01"}, "until"),
        ({"since": "2025-01-01", "until": "2025-01-01"}, "until"),
    ],
)
def test_bad_usage_query_parameters_are_400_naming_the_parameter(params: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_query(params)
    assert caught.value.status == 400
    assert caught.value.param == param


def test_the_usage_table_has_a_row_per_group_and_a_total_line() -> None:
    doc = {
        "group_by": "key",
        "data": [
            {
                "key_id": "key_a",
                "key_name": "team-a",
                "requests": 2,
                "inputs": 3,
                "prompt_tokens": 40,
                "cost": 0.0008,
            },
            {
                "key_id": "api-key-1",
                "key_name": None,
                "requests": 1,
                "inputs": 1,
                "prompt_tokens": 5,
                "cost": 0.0,
            },
        ],
        "total": {"requests": 3, "inputs": 4, "prompt_tokens": 45, "cost": 0.0008},
    }
    lines = render_table(doc).splitlines()
    assert lines[0].split() == ["KEY_ID", "KEY_NAME", "REQUESTS", "INPUTS", "PROMPT_TOKENS", "COST"]
    assert lines[1].split() == ["key_a", "team-a", "2", "3", "40", "0.000800"]
    assert lines[2].split() == ["api-key-1", "-", "1", "1", "5", "0.000000"]
    assert lines[3].split() == ["TOTAL", "3", "4", "45", "0.000800"]
    ungrouped = render_table({"group_by": None, "data": [], "total": doc["total"]}).splitlines()
    assert ungrouped[1].split() == ["TOTAL", "3", "4", "45", "0.000800"]
