"""`embedserve keys` and `embedserve usage` as an operator runs them (JSON shapes for scripts, one-line
errors), and the ledger's durability with a real server process: SIGTERM writes every pending record,
and SIGKILL loses at most the records of the last flush interval."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import private_data_dir, wait_until_ok

KEY_FIELDS = {
    "id",
    "object",
    "name",
    "prefix",
    "models",
    "rpm",
    "tpm",
    "expires_at",
    "admin",
    "created_at",
    "revoked_at",
    "status",
}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedserve", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


def cli_json(data_dir: Path, *args: str) -> Any:
    result = cli(data_dir, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_keys_create_prints_the_secret_once_and_list_never_shows_it(tmp_path: Path) -> None:
    created = cli_json(
        tmp_path,
        "keys",
        "create",
        "--name",
        "team-a",
        "--models",
        "m1,m2",
        "--rpm",
        "60",
        "--tpm",
        "10000",
        "--expires",
        "2031-01-31",
        "--admin",
    )
    assert set(created) == KEY_FIELDS | {"key"}
    assert re.fullmatch(r"es-[A-Za-z0-9_-]{43}", created["key"])
    assert created["key"].startswith(created["prefix"]) and len(created["prefix"]) == 8
    assert (
        created["name"],
        created["models"],
        created["rpm"],
        created["tpm"],
        created["admin"],
        created["status"],
        created["revoked_at"],
    ) == ("team-a", ["m1", "m2"], 60, 10000, True, "active", None)
    assert created["expires_at"] == "2031-01-31T00:00:00Z" and ISO.match(created["created_at"])
    listed = cli_json(tmp_path, "keys", "list")
    assert listed == [{k: v for k, v in created.items() if k != "key"}]
    assert created["key"] not in cli(tmp_path, "keys", "list").stdout
    assert cli_json(tmp_path, "keys", "show", created["id"]) == listed[0]
    for stored in tmp_path.iterdir():  # the database and the pepper hold no trace of the secret
        if stored.is_file():
            assert created["key"][8:].encode() not in stored.read_bytes()
    assert oct((tmp_path / "key-pepper").stat().st_mode & 0o777) == "0o600"


def test_keys_create_in_text_prints_the_secret_on_a_line_of_its_own(tmp_path: Path) -> None:
    result = cli(tmp_path, "keys", "create", "--name", "plain")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"es-[A-Za-z0-9_-]{43}", lines[1])
    assert "not be shown again" in result.stderr


def test_keys_update_changes_only_what_it_is_given_and_clears_with_none_all_never(tmp_path: Path) -> None:
    key = cli_json(
        tmp_path, "keys", "create", "--name", "a", "--rpm", "5", "--models", "m1", "--expires", "30d"
    )
    updated = cli_json(tmp_path, "keys", "update", key["id"], "--tpm", "500", "--name", "renamed")
    assert (updated["name"], updated["rpm"], updated["tpm"], updated["models"]) == ("renamed", 5, 500, ["m1"])
    assert updated["expires_at"] == key["expires_at"]
    cleared = cli_json(
        tmp_path,
        "keys",
        "update",
        key["id"],
        "--rpm",
        "none",
        "--models",
        "all",
        "--expires",
        "never",
        "--admin",
    )
    assert (cleared["rpm"], cleared["models"], cleared["expires_at"], cleared["admin"]) == (
        None,
        None,
        None,
        True,
    )
    assert cli_json(tmp_path, "keys", "update", key["id"], "--no-admin")["admin"] is False
    revoked = cli_json(tmp_path, "keys", "revoke", key["id"])
    assert revoked["status"] == "revoked" and ISO.match(revoked["revoked_at"])


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("keys", "revoke", "key_nope"), 1, "No API key with id 'key_nope'"),
        (("keys", "update", "key_nope", "--rpm", "3"), 1, "No API key"),
        (("keys", "create", "--name", "x", "--rpm", "0"), 2, "'rpm' must be"),
        (("keys", "create", "--name", "x", "--rpm", "lots"), 2, "positive integer or 'none'"),
        (("keys", "create", "--name", "x", "--expires", "whenever"), 2, "'expires_at' must be"),
        (("keys", "create"), 2, "--name"),
        (("usage", "--since", "last week"), 2, "'since' must be"),
        (("usage", "--group-by", "month"), 2, "invalid choice"),
        (("usage", "--database-url", "mysql://x/y"), 2, "postgresql://"),
    ],
)
def test_cli_errors_are_one_line_without_a_traceback(
    tmp_path: Path, args: tuple[str, ...], code: int, words: str
) -> None:
    result = cli(tmp_path, *args)
    assert result.returncode == code, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1


TIME_RANGE = "from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z"


@pytest.mark.parametrize(
    "when",
    ["999999999d", "99999999999999999999999d", "9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+14:00"],
)
def test_keys_create_expiring_outside_1970_to_9999_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, when: str
) -> None:
    result = cli(tmp_path, "keys", "create", "--name", "x", "--expires", when)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"embedserve: error: 'expires_at' must be a time {TIME_RANGE} (UTC); got {when!r}."
    ]
    assert not (tmp_path / "embedserve.db").exists()  # refused before the database was opened
    assert cli_json(tmp_path, "keys", "list") == []


def test_keys_update_to_an_expiry_past_9999_exits_2_and_changes_nothing(tmp_path: Path) -> None:
    key = cli_json(tmp_path, "keys", "create", "--name", "a", "--expires", "30d")
    result = cli(tmp_path, "keys", "update", key["id"], "--expires", "999999999d", "--rpm", "5")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert TIME_RANGE in result.stderr and "Traceback" not in result.stderr
    assert cli_json(tmp_path, "keys", "show", key["id"]) == {k: v for k, v in key.items() if k != "key"}


@pytest.mark.parametrize(
    ("flag", "when"),
    [
        ("--since", "9999-12-31T23:59:59-12:00"),
        ("--since", "0001-01-01T00:00:00+14:00"),
        ("--until", "9999-12-31T23:00:00-05:00"),
    ],
)
def test_usage_outside_1970_to_9999_exits_2_with_one_line(tmp_path: Path, flag: str, when: str) -> None:
    result = cli(tmp_path, "usage", flag, when)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"embedserve: error: '{flag[2:]}' must be a time {TIME_RANGE} (UTC); got {when!r}."
    ]


def test_usage_on_an_empty_ledger_is_a_zero_total(tmp_path: Path) -> None:
    doc = cli_json(tmp_path, "usage")
    assert doc == {
        "object": "usage_report",
        "group_by": None,
        "filters": {"key": None, "model": None, "since": None, "until": None},
        "data": [],
        "total": {"requests": 0, "inputs": 0, "prompt_tokens": 0, "cost": 0.0},
    }
    table = cli(tmp_path, "usage").stdout.splitlines()
    assert table[-1].split() == ["TOTAL", "0", "0", "0", "0.000000"]


def test_a_different_pepper_stops_the_server_with_one_line(tmp_path: Path) -> None:
    cli_json(tmp_path, "keys", "create", "--name", "a")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedserve",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
            "--key-pepper",
            "not-the-one",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert result.returncode == 2
    assert "another key pepper" in result.stderr and "Traceback" not in result.stderr


def _unreachable(tmp_path: Path, kind: str) -> str:
    """A --database-url that names a database nothing can open."""
    if kind == "postgresql":
        return f"postgresql://embedserve@127.0.0.1:{_free_port()}/embedserve"  # nothing listens there
    (tmp_path / "a-directory").mkdir()
    return f"sqlite:///{tmp_path / 'a-directory'}"  # SQLite cannot open a directory as its file


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
@pytest.mark.parametrize(
    "command",
    [("serve", "--port", "0"), ("keys", "list"), ("keys", "create", "--name", "x"), ("usage",)],
    ids=["serve", "keys list", "keys create", "usage"],
)
def test_a_database_that_cannot_be_reached_exits_1_with_one_line(
    tmp_path: Path, command: tuple[str, ...], kind: str
) -> None:
    result = cli(tmp_path, *command, "--database-url", _unreachable(tmp_path, kind))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("embedserve: error: ") and "database" in lines[0]


@pytest.mark.parametrize(
    "command", [("serve", "--port", "0"), ("keys", "list"), ("usage",)], ids=["serve", "keys", "usage"]
)
def test_a_database_url_naming_a_file_that_is_no_database_is_a_bad_value_exit_2(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    (tmp_path / "notes.txt").write_text("these are not the tables you are looking for\n" * 100)
    result = cli(tmp_path, *command, "--database-url", f"sqlite:///{tmp_path / 'notes.txt'}")
    assert result.returncode == 2, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert "not a database" in result.stderr


# ---- durability with a real server process ----------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(data_dir: Path, *flags: str) -> tuple[subprocess.Popen[str], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedserve",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--api-key",
            "sk-durable",
            *flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{base}/ready", alive=lambda: proc.poll() is None)
    except BaseException:
        proc.kill()
        raise
    return proc, base


def _ledger(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(data_dir / "embedserve.db") as conn:
        return dict(conn.execute("SELECT request_id, prompt_tokens FROM usage_records").fetchall())


def _send(base: str, request_id: str, text: str) -> int:
    response = httpx.post(
        f"{base}/v1/embeddings",
        json={"model": "all-MiniLM-L6-v2", "input": text},
        headers={"Authorization": "Bearer sk-durable", "X-Request-ID": request_id},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    tokens: int = response.json()["usage"]["prompt_tokens"]
    return tokens


def test_sigterm_writes_every_pending_usage_record_before_exit(tmp_path: Path) -> None:
    data_dir = private_data_dir(tmp_path / "data")
    proc, base = _serve(data_dir, "--usage-flush-interval", "60")  # no flush would come by itself
    try:
        sent = {f"term-{i}": _send(base, f"term-{i}", "hello " * (i + 1)) for i in range(5)}
        assert _ledger(data_dir) == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert _ledger(data_dir) == sent
    assert "wrote the last 5 records" in stderr


FLUSH_S = 0.5
SLACK_S = 0.3  # the write itself, and a busy machine waking the flusher late


def test_a_crash_loses_at_most_the_records_of_the_last_flush_interval(tmp_path: Path) -> None:
    data_dir = private_data_dir(tmp_path / "data")
    proc, base = _serve(data_dir, "--usage-flush-interval", str(FLUSH_S))
    finished: dict[str, float] = {}
    sent: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 4 * FLUSH_S
        i = 0
        while time.monotonic() < deadline:
            sent[f"crash-{i}"] = _send(base, f"crash-{i}", f"request number {i}")
            finished[f"crash-{i}"] = time.monotonic()
            i += 1
    finally:
        proc.kill()  # SIGKILL: no shutdown, no last flush
        killed = time.monotonic()
        proc.communicate(timeout=60)
    written = _ledger(data_dir)
    assert set(written) <= set(sent)
    assert all(written[r] == sent[r] for r in written)
    lost = set(sent) - set(written)
    too_old = [r for r in lost if killed - finished[r] > FLUSH_S + SLACK_S]
    assert too_old == [], f"records older than the flush interval were lost: {too_old}"
    assert len(written) >= len(sent) // 2  # most were written while the server ran
