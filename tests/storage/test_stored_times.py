"""Times already in the database that no version accepts now (a key's expiry past 9999 written by an
older one, a row edited by hand: huge, infinite, NaN) on SQLite and PostgreSQL alike: listing and showing
keys, the key ring, usage reports by day, GET /v1/keys and the CLI all keep working, and render such a
time as the nearest end of the years 1..9999 (NaN, which only PostgreSQL stores, as null)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from conftest import Storage
from embedserve.db import Database
from embedserve.keys import KeyChanges, KeyRing, KeyStore, key_json, load_pepper
from embedserve.types import UsageRecord
from embedserve.usage import UsageQuery, report, write_records
from support import live_server

ADMIN = "sk-stored-times-admin"
LAST = "9999-12-31T23:59:59Z"
FIRST = "0001-01-01T00:00:00Z"


def poison(db: Database, key_id: str, **columns: float) -> None:
    with db.transaction() as tx:
        for column, value in columns.items():
            tx.execute(f"UPDATE api_keys SET {column} = ? WHERE id = ?", (value, key_id))
        tx.execute("UPDATE embedserve_meta SET keys_version = keys_version + 1 WHERE id = 1")


def poisoned_store(storage: Storage) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Keys with times no version accepts now, and usage records of such times. -> (name -> secret,
    name -> the fields each must render with)."""
    db = storage.open()
    try:
        store = KeyStore(db)
        pepper = load_pepper(None, storage.data_dir)
        rows: dict[str, tuple[dict[str, float], dict[str, Any]]] = {
            # "99999999999999999999999d" and "9999-12-31T23:00:00-05:00" as an older version stored them
            "far": ({"expires_at": 8.64e27}, {"expires_at": LAST, "status": "active"}),
            "year-10000": ({"expires_at": 253402315200.0}, {"expires_at": LAST, "status": "active"}),
            "infinite": (
                {"expires_at": math.inf, "revoked_at": -math.inf},
                {"expires_at": LAST, "revoked_at": FIRST, "status": "revoked"},
            ),
            "ancient": ({"created_at": -1e300}, {"created_at": FIRST, "status": "active"}),
        }
        if storage.kind == "postgresql":  # SQLite stores a NaN as NULL
            rows["nan"] = ({"expires_at": math.nan}, {"expires_at": None, "status": "active"})
        secrets, expected = {}, {}
        for name, (columns, fields) in rows.items():
            record, secrets[name] = store.create(pepper, KeyChanges(name=name))
            poison(db, record.id, **columns)
            expected[name] = fields
        times = [1e20, -1e300] + ([math.nan] if storage.kind == "postgresql" else [])
        write_records(
            db,
            [
                UsageRecord(
                    key_id="k",
                    model="m",
                    prompt_tokens=5,
                    inputs=1,
                    request_id="r",
                    created_at=at,
                    latency_ms=1.0,
                    price_per_million=0.0,
                )
                for at in times
            ],
        )
        return secrets, expected
    finally:
        db.close()


def cli(storage: Storage, *args: str) -> subprocess.CompletedProcess[str]:
    store = ["--data-dir", str(storage.data_dir)] + (
        [] if storage.url is None else ["--database-url", storage.url]
    )
    return subprocess.run(
        [sys.executable, "-m", "embedserve", *args, *store],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


def by_name(keys: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {key["name"]: key for key in keys}


def test_the_store_and_the_ring_read_unrenderable_times_and_render_them_at_the_nearest_end(
    storage: Storage,
) -> None:
    secrets, expected = poisoned_store(storage)
    db = storage.open()
    try:
        store = KeyStore(db)
        listed = by_name([key_json(record) for record in store.list_keys()])
        for name, fields in expected.items():
            assert {k: listed[name][k] for k in fields} == fields, name
            assert key_json(store.get(listed[name]["id"])) == listed[name]
        ring = KeyRing(store, load_pepper(None, storage.data_dir))
        ring.refresh_sync()
        assert ring.authenticate(secrets["far"]).name == "far"  # it expires after 9999: still valid
        by_day = report(db, UsageQuery(group_by="day"))
        assert {row["day"]: row["requests"] for row in by_day["data"]} == {
            "9999-12-31": 1,
            "0001-01-01": 1,
            **({None: 1} if storage.kind == "postgresql" else {}),
        }
    finally:
        db.close()


def test_the_cli_lists_shows_and_reports_them_without_a_traceback(storage: Storage) -> None:
    _, expected = poisoned_store(storage)
    listed = cli(storage, "keys", "list")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert LAST in listed.stdout and FIRST in listed.stdout
    as_json = cli(storage, "keys", "list", "--json")
    assert as_json.returncode == 0, as_json.stderr
    keys = by_name(json.loads(as_json.stdout))
    for name, fields in expected.items():
        assert {k: keys[name][k] for k in fields} == fields, name
        shown = cli(storage, "keys", "show", keys[name]["id"])
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        assert shown.stdout.startswith(keys[name]["id"])
    for group in ("key", "day"):
        usage = cli(storage, "usage", "--group-by", group)
        assert usage.returncode == 0 and "Traceback" not in usage.stderr, usage.stderr
    assert "9999-12-31" in cli(storage, "usage", "--group-by", "day").stdout


@pytest.mark.model  # a live server on the bundled model
def test_a_running_server_lists_and_shows_them_and_keeps_serving(storage: Storage) -> None:
    secrets, expected = poisoned_store(storage)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with live_server(storage.settings(admin_keys=[ADMIN])) as live:
        listed = httpx.get(f"{live.v1}/keys", headers=auth)
        assert listed.status_code == 200, listed.text
        keys = by_name(listed.json()["data"])
        for name, fields in expected.items():
            assert {k: keys[name][k] for k in fields} == fields, name
            shown = httpx.get(f"{live.v1}/keys/{keys[name]['id']}", headers=auth)
            assert shown.status_code == 200 and shown.json() == keys[name]
        usage = httpx.get(f"{live.v1}/usage", params={"group_by": "day"}, headers=auth)
        assert usage.status_code == 200, usage.text
        assert {"9999-12-31", "0001-01-01"} <= {row["day"] for row in usage.json()["data"]}
        embedded = httpx.post(
            f"{live.v1}/embeddings",
            json={"model": "all-MiniLM-L6-v2", "input": "x"},
            headers={"Authorization": f"Bearer {secrets['far']}"},
        )
        assert embedded.status_code == 200, embedded.text
