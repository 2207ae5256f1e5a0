"""The usage ledger on a real database, SQLite and PostgreSQL alike: records wait in memory until a flush
writes them in one batch, a failed write keeps them for the next, close() writes what is left, and the
reports group, filter and price them exactly."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import Storage
from embedserve.db import Database
from embedserve.journal import UsageJournal
from embedserve.keys import KeyChanges, KeyStore
from embedserve.timestamps import parse_time
from embedserve.types import UsageRecord
from embedserve.usage import UsageLedger, UsageQuery, render_table, report, write_records

JAN_31_LATE = datetime(2025, 1, 31, 23, 30, tzinfo=UTC).timestamp()
FEB_1_EARLY = datetime(2025, 2, 1, 0, 30, tzinfo=UTC).timestamp()


def rec(
    key: str, model: str, tokens: int, *, at: float = JAN_31_LATE, inputs: int = 1, price: float = 0.0
) -> UsageRecord:
    return UsageRecord(
        key_id=key,
        model=model,
        prompt_tokens=tokens,
        inputs=inputs,
        request_id=f"req-{key}-{tokens}",
        created_at=at,
        latency_ms=1.5,
        price_per_million=price,
    )


def count(db: Database) -> int:
    with db.transaction(write=False) as tx:
        ((n,),) = tx.fetchall("SELECT COUNT(*) FROM usage_records")
    return int(n)


def test_records_are_written_at_the_flush_and_not_before(storage: Storage, tmp_path: Path) -> None:
    db = storage.open()
    try:

        async def scenario() -> None:
            ledger = UsageLedger(db, flush_interval_s=60, journal=UsageJournal(tmp_path / "journal"))
            for i in range(250):
                ledger.record(rec("key_a", "m", i + 1))
            assert ledger.pending == 250 and count(db) == 0
            assert await ledger.flush() == 250
            assert ledger.pending == 0 and count(db) == 250
            assert await ledger.flush() == 0

        asyncio.run(scenario())
        with db.transaction(write=False) as tx:
            row = tx.fetchall(
                "SELECT key_id, model, prompt_tokens, inputs, request_id, created_at, "
                "latency_ms, price_per_million FROM usage_records WHERE prompt_tokens = 7"
            )
        assert row == [("key_a", "m", 7, 1, "req-key_a-7", JAN_31_LATE, 1.5, 0.0)]
    finally:
        db.close()


def test_the_background_flush_writes_within_the_interval_and_close_writes_the_rest(
    storage: Storage, tmp_path: Path
) -> None:
    db = storage.open()
    try:

        async def scenario() -> None:
            ledger = UsageLedger(db, flush_interval_s=0.2, journal=UsageJournal(tmp_path / "journal"))
            task = asyncio.create_task(ledger.run())
            ledger.record(rec("key_a", "m", 5))
            await asyncio.sleep(0.6)
            assert count(db) == 1
            task.cancel()
            ledger.record(rec("key_a", "m", 6))
            await ledger.close(deadline=time.monotonic() + 10)
            assert count(db) == 2

        asyncio.run(scenario())
    finally:
        db.close()


def test_a_flush_cancelled_mid_write_neither_loses_nor_doubles_records(
    storage: Storage, tmp_path: Path
) -> None:
    db = storage.open()
    try:

        async def scenario() -> None:
            ledger = UsageLedger(db, flush_interval_s=60, journal=UsageJournal(tmp_path / "journal"))
            for i in range(2000):
                ledger.record(rec("key_a", "m", i + 1))
            flushing = asyncio.create_task(ledger.flush())
            await asyncio.sleep(0.001)  # the write is under way in its thread
            flushing.cancel()  # as the flusher task is at shutdown
            await ledger.close(deadline=time.monotonic() + 10)

        asyncio.run(scenario())
        assert count(db) == 2000
    finally:
        db.close()


def test_a_failed_write_keeps_the_records_for_the_next_flush(storage: Storage, tmp_path: Path) -> None:
    db = storage.open()
    try:

        async def scenario() -> None:
            ledger = UsageLedger(db, flush_interval_s=60, journal=UsageJournal(tmp_path / "journal"))
            ledger.record(rec("key_a", "m", 5))
            with db.transaction() as tx:  # a real failure: the table is gone for a while
                tx.execute("ALTER TABLE usage_records RENAME TO usage_records_away")
            with pytest.raises(Exception):  # noqa: B017, PT011 - SQLite and psycopg raise differently
                await ledger.flush()
            ledger.record(rec("key_a", "m", 6))
            assert ledger.pending == 2
            with db.transaction() as tx:
                tx.execute("ALTER TABLE usage_records_away RENAME TO usage_records")
            assert await ledger.flush() == 2

        asyncio.run(scenario())
        assert count(db) == 2
    finally:
        db.close()


def test_reports_group_by_key_model_and_utc_day_and_price_each_record(storage: Storage) -> None:
    db = storage.open()
    try:
        team, _ = KeyStore(db).create(b"p", KeyChanges(name="team-a"))
        write_records(
            db,
            [
                rec(team.id, "big", 1_000, price=0.5, inputs=2),
                rec(team.id, "big", 3_000, price=0.5, at=FEB_1_EARLY),
                rec(team.id, "small", 700, price=0.0, at=FEB_1_EARLY),
                rec("api-key-abc", "big", 2_000, price=0.1),  # the price when it was used
            ],
        )
        by_key = report(db, UsageQuery(group_by="key"))
        assert by_key["data"] == [
            {
                "key_id": "api-key-abc",
                "key_name": None,
                "key_prefix": None,
                "requests": 1,
                "inputs": 1,
                "prompt_tokens": 2000,
                "cost": pytest.approx(0.0002),
            },
            {
                "key_id": team.id,
                "key_name": "team-a",
                "key_prefix": team.prefix,
                "requests": 3,
                "inputs": 4,
                "prompt_tokens": 4700,
                "cost": pytest.approx(0.002),
            },
        ]
        assert by_key["total"] == {
            "requests": 4,
            "inputs": 5,
            "prompt_tokens": 6700,
            "cost": pytest.approx(0.0022),
        }
        by_model = report(db, UsageQuery(group_by="model"))
        assert [(r["model"], r["prompt_tokens"]) for r in by_model["data"]] == [("big", 6000), ("small", 700)]
        by_day = report(db, UsageQuery(group_by="day"))
        assert [(r["day"], r["requests"]) for r in by_day["data"]] == [("2025-01-31", 2), ("2025-02-01", 2)]
        february = report(db, UsageQuery(since=parse_time("2025-02-01", "since"), key=team.id))
        assert february["data"] == []
        assert february["total"]["prompt_tokens"] == 3700
        assert february["filters"] == {
            "key": team.id,
            "model": None,
            "since": "2025-02-01T00:00:00Z",
            "until": None,
        }
        january = report(db, UsageQuery(until=parse_time("2025-02-01", "until"), model="big"))
        assert january["total"]["prompt_tokens"] == 3000  # until is exclusive
        empty = report(db, UsageQuery(key="key_nobody", group_by="key"))
        assert empty["data"] == [] and empty["total"] == {
            "requests": 0,
            "inputs": 0,
            "prompt_tokens": 0,
            "cost": 0.0,
        }
    finally:
        db.close()


def test_reports_group_by_batch_with_the_online_requests_first_and_each_batch_at_its_price(
    storage: Storage,
) -> None:
    db = storage.open()
    try:
        write_records(
            db,
            [
                rec("key_a", "m", 100, price=2.0),
                replace(rec("key_a", "m", 40, price=1.0), batch_id="batch_2", record_id="batch_2:1"),
                replace(rec("key_a", "m", 60, price=1.0), batch_id="batch_2", record_id="batch_2:2"),
                replace(rec("key_b", "m", 10, price=1.0), batch_id="batch_1", record_id="batch_1:1"),
            ],
        )
        by_batch = report(db, UsageQuery(group_by="batch"))
        assert [(r["batch_id"], r["requests"], r["prompt_tokens"]) for r in by_batch["data"]] == [
            (None, 1, 100),
            ("batch_1", 1, 10),
            ("batch_2", 2, 100),
        ]
        assert by_batch["data"][2]["cost"] == pytest.approx(100 * 1.0 / 1_000_000)
        assert by_batch["total"]["prompt_tokens"] == 210
        lines = render_table(by_batch).splitlines()
        assert lines[0].split()[:2] == ["BATCH_ID", "REQUESTS"]
        assert [line.split()[0] for line in lines[1:]] == ["-", "batch_1", "batch_2", "TOTAL"]
    finally:
        db.close()
