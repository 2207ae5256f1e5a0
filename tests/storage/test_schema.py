"""The schema on a real database, SQLite and PostgreSQL alike: a version-1 or version-2 database (as
earlier releases made them) is migrated in place on first open, once even when several processes open it
together, keeping its keys and records; a newer one is refused and left alone."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import pytest

from conftest import Storage
from embedserve.db import SCHEMA_VERSION, SQLITE_FILE
from embedserve.errors import ConfigError
from embedserve.types import UsageRecord
from embedserve.usage import UsageQuery, report, write_records

#: The schema exactly as version 1 created it.
V1_SCHEMA = """
CREATE TABLE embedserve_meta (id INTEGER PRIMARY KEY CHECK (id = 1), schema_version INTEGER NOT NULL,
    keys_version BIGINT NOT NULL, pepper_check TEXT);
CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, prefix TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE, models TEXT, rpm INTEGER, tpm INTEGER, expires_at DOUBLE PRECISION,
    admin INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION);
CREATE TABLE usage_records (id {id_column}, key_id TEXT NOT NULL, model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, inputs INTEGER NOT NULL, request_id TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, latency_ms DOUBLE PRECISION NOT NULL,
    price_per_million DOUBLE PRECISION NOT NULL);
CREATE INDEX usage_records_created_at ON usage_records (created_at);
CREATE INDEX usage_records_key_created_at ON usage_records (key_id, created_at);
INSERT INTO embedserve_meta (id, schema_version, keys_version) VALUES (1, {version}, 0);
INSERT INTO usage_records (key_id, model, prompt_tokens, inputs, request_id, created_at, latency_ms,
    price_per_million) VALUES ('key_old', 'm', 100, 1, 'r1', 1.7e9, 1.0, 0.0);
INSERT INTO usage_records (key_id, model, prompt_tokens, inputs, request_id, created_at, latency_ms,
    price_per_million) VALUES ('key_old', 'm', 200, 2, 'r1', 1.7e9, 1.0, 0.0)
"""


def make_old_database(storage: Storage, version: int = 1) -> None:
    if storage.url is None:
        script = V1_SCHEMA.format(id_column="INTEGER PRIMARY KEY", version=version)
        lite = sqlite3.connect(storage.data_dir / SQLITE_FILE)
        lite.executescript(script)
        lite.close()
        return
    import psycopg

    script = V1_SCHEMA.format(id_column="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", version=version)
    with psycopg.connect(storage.url, autocommit=True) as conn:
        for statement in script.split(";"):
            conn.execute(statement)


def columns(storage: Storage) -> list[str]:
    db = storage.open()
    try:
        with db.transaction(write=False) as tx:
            if storage.url is None:
                return [row[1] for row in tx.fetchall("PRAGMA table_info(usage_records)")]
            return [
                row[0]
                for row in tx.fetchall(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage_records' "
                    "ORDER BY ordinal_position"
                )
            ]
    finally:
        db.close()


def test_a_version_1_database_is_migrated_once_by_processes_opening_it_together_and_keeps_its_records(
    storage: Storage,
) -> None:
    make_old_database(storage)
    results: list[Any] = []

    def open_it() -> None:
        try:
            db = storage.open()
            db.close()
            results.append("ok")
        except Exception as exc:  # reported below, not lost in a thread
            results.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == ["ok"] * 4
    assert columns(storage)[-2:] == ["record_id", "batch_id"]
    db = storage.open()
    try:
        with db.transaction(write=False) as tx:
            assert tx.fetchall("SELECT schema_version FROM embedserve_meta") == [(SCHEMA_VERSION,)]
        assert report(db, UsageQuery())["total"]["prompt_tokens"] == 300  # old rows, NULL record ids
        new = UsageRecord(
            key_id="key_new",
            model="m",
            prompt_tokens=5,
            inputs=1,
            request_id="r1",
            created_at=1.7e9,
            latency_ms=1.0,
            price_per_million=0.0,
        )
        assert write_records(db, [new]) == 1
        assert write_records(db, [new]) == 0  # the unique record id holds on a migrated table too
        assert report(db, UsageQuery())["total"] == {
            "requests": 3,
            "inputs": 4,
            "prompt_tokens": 305,
            "cost": 0.0,
        }
    finally:
        db.close()


def test_a_database_newer_than_this_release_is_refused_and_left_alone(storage: Storage) -> None:
    make_old_database(storage, version=SCHEMA_VERSION + 1)
    with pytest.raises(
        ConfigError,
        match=f"has schema version {SCHEMA_VERSION + 1}; this embedserve reads version {SCHEMA_VERSION}",
    ):
        storage.open()
    if storage.url is None:
        lite = sqlite3.connect(storage.data_dir / SQLITE_FILE)
        names = [row[1] for row in lite.execute("PRAGMA table_info(usage_records)")]
        lite.close()
    else:
        import psycopg

        with psycopg.connect(storage.url) as conn:
            names = [
                row[0]
                for row in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage_records'"
                )
            ]
    assert "record_id" not in names


#: Version 2 as the release before the Batch API made it, with a key and usage in it.
V2_DATA = """
ALTER TABLE usage_records ADD COLUMN record_id TEXT;
CREATE UNIQUE INDEX usage_records_record_id ON usage_records (record_id);
INSERT INTO api_keys (id, name, prefix, key_hash, models, rpm, tpm, expires_at, admin, created_at,
    revoked_at) VALUES ('key_v2', 'ops', 'es-abc', 'aa11', NULL, 60, NULL, NULL, 1, 1.7e9, NULL);
UPDATE embedserve_meta SET keys_version = 7, pepper_check = 'check';
INSERT INTO usage_records (key_id, model, prompt_tokens, inputs, request_id, created_at, latency_ms,
    price_per_million, record_id) VALUES ('key_v2', 'm', 40, 1, 'r2', 1.7e9, 1.0, 0.5, 'rec-v2')
"""


def test_a_version_2_database_upgraded_in_place_keeps_its_keys_and_ledger_and_gains_the_batch_tables(
    storage: Storage,
) -> None:
    make_old_database(storage, version=2)
    if storage.url is None:
        lite = sqlite3.connect(storage.data_dir / SQLITE_FILE)
        lite.executescript(V2_DATA)
        lite.close()
    else:
        import psycopg

        with psycopg.connect(storage.url, autocommit=True) as conn:
            for statement in V2_DATA.split(";"):
                conn.execute(statement)
    db = storage.open()
    try:
        with db.transaction(write=False) as tx:
            assert tx.fetchall("SELECT schema_version, keys_version, pepper_check FROM embedserve_meta") == [
                (SCHEMA_VERSION, 7, "check")
            ]
            assert tx.fetchall("SELECT id, name, rpm, admin FROM api_keys") == [("key_v2", "ops", 60, 1)]
            for table in ("files", "batches", "batch_requests"):
                assert tx.fetchall(f"SELECT COUNT(*) FROM {table}") == [(0,)]
        assert report(db, UsageQuery())["total"] == {
            "requests": 3,
            "inputs": 4,
            "prompt_tokens": 340,
            "cost": 40 * 0.5 / 1_000_000,
        }
        again = UsageRecord(
            key_id="key_v2",
            model="m",
            prompt_tokens=40,
            inputs=1,
            request_id="r2",
            created_at=1.7e9,
            latency_ms=1.0,
            price_per_million=0.5,
            record_id="rec-v2",
            batch_id="batch_x",
        )
        assert write_records(db, [again]) == 0  # its record id survived the upgrade, unique as before
    finally:
        db.close()
    db = storage.open()  # a second start finds nothing to migrate
    db.close()
    assert columns(storage)[-2:] == ["record_id", "batch_id"]
