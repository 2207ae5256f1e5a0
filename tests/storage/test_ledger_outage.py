"""The usage ledger when its database fails, SQLite and PostgreSQL alike: close() retries until its
deadline and then journals what is left, the next replay writes each journaled record exactly once (also
after a replay cut short, or one run twice), records beyond what the ledger holds in memory go to the
journal instead of away, and a record id, not the client's request id, is what counts once."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import Storage
from embedserve.db import Database
from embedserve.journal import UsageJournal, decode_record
from embedserve.types import UsageRecord
from embedserve.usage import UsageLedger, replay_journal, write_records


def rec(tokens: int, request_id: str = "req") -> UsageRecord:
    return UsageRecord(
        key_id="key_a",
        model="m",
        prompt_tokens=tokens,
        inputs=1,
        request_id=request_id,
        created_at=1.7e9 + tokens,
        latency_ms=2.5,
        price_per_million=0.1,
    )


def totals(db: Database) -> tuple[int, int]:
    """(records, prompt tokens) in the ledger."""
    with db.transaction(write=False) as tx:
        ((n, tokens),) = tx.fetchall("SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0) FROM usage_records")
    return int(n), int(tokens)


@contextmanager
def table_away(db: Database) -> Iterator[None]:
    """A real failure of every write: the table is renamed for the duration."""
    with db.transaction() as tx:
        tx.execute("ALTER TABLE usage_records RENAME TO usage_records_away")
    try:
        yield
    finally:
        with db.transaction() as tx:
            tx.execute("ALTER TABLE usage_records_away RENAME TO usage_records")


def journal_lines(journal: UsageJournal) -> list[UsageRecord]:
    return [decode_record(line) for line in journal.path.read_bytes().splitlines()]


def test_a_record_written_twice_counts_once_and_a_reused_request_id_counts_each_time(
    storage: Storage,
) -> None:
    db = storage.open()
    try:
        records = [rec(1, "same-id"), rec(2, "same-id"), rec(3, "other")]
        assert write_records(db, records) == 3
        assert write_records(db, records) == 0  # a retry of a write that committed unseen
        assert write_records(db, [records[0], rec(4, "same-id")]) == 1
        assert totals(db) == (4, 10)
    finally:
        db.close()


def test_close_journals_what_the_database_refuses_until_the_deadline_and_the_replay_writes_it_once(
    storage: Storage, tmp_path: Path
) -> None:
    db = storage.open()
    journal = UsageJournal(tmp_path / "usage-journal.jsonl")
    records = [rec(i + 1) for i in range(5)]
    try:

        async def shutdown() -> tuple[int, float]:
            ledger = UsageLedger(db, flush_interval_s=60, journal=journal)
            for record in records:
                ledger.record(record)
            started = time.monotonic()
            lost = await ledger.close(deadline=started + 0.6)
            return lost, time.monotonic() - started

        with table_away(db):
            lost, took = asyncio.run(shutdown())
        assert lost == 0
        assert took >= 0.5  # it kept retrying for the grace, not three tries
        assert journal_lines(journal) == records  # record ids included
        assert totals(db) == (0, 0)

        copy = tmp_path / "copy.jsonl"
        shutil.copy(journal.path, copy)
        first = replay_journal(db, journal)
        assert (first.records, first.new, first.rejected) == (5, 5, 0)
        assert not journal.path.exists()
        assert totals(db) == (5, 15)
        # A crash after the replay committed but before the journal was removed: replayed again.
        shutil.copy(copy, journal.path)
        again = replay_journal(db, journal)
        assert (again.records, again.new) == (5, 0)
        assert totals(db) == (5, 15)
    finally:
        db.close()


def test_a_replay_cut_short_after_some_chunks_counts_every_record_once_when_run_again(
    storage: Storage, tmp_path: Path
) -> None:
    db = storage.open()
    journal = UsageJournal(tmp_path / "usage-journal.jsonl")
    records = [rec(i + 1) for i in range(10)]
    journal.append(records)
    try:
        committed: list[int] = []

        def crash_after_two_chunks(batch: Sequence[UsageRecord]) -> int:
            if len(committed) == 2:
                raise KeyboardInterrupt  # as the process dying here would: nothing after runs
            committed.append(write_records(db, batch))
            return committed[-1]

        with pytest.raises(KeyboardInterrupt):
            journal.replay(crash_after_two_chunks, chunk=3)
        assert totals(db) == (6, 21)
        assert journal.path.exists()
        replayed = replay_journal(db, journal)
        assert (replayed.records, replayed.new) == (10, 4)
        assert totals(db) == (10, 55)
        assert not journal.path.exists()
    finally:
        db.close()


def test_close_writes_everything_when_the_database_comes_back_within_the_grace(
    storage: Storage, tmp_path: Path
) -> None:
    db = storage.open()
    journal = UsageJournal(tmp_path / "usage-journal.jsonl")
    try:

        async def scenario() -> int:
            ledger = UsageLedger(db, flush_interval_s=60, journal=journal)
            for i in range(3):
                ledger.record(rec(i + 1))
            with db.transaction() as tx:
                tx.execute("ALTER TABLE usage_records RENAME TO usage_records_away")
            closing = asyncio.create_task(ledger.close(deadline=time.monotonic() + 30))
            await asyncio.sleep(0.3)
            assert not closing.done()
            with db.transaction() as tx:
                tx.execute("ALTER TABLE usage_records_away RENAME TO usage_records")
            return await closing

        assert asyncio.run(scenario()) == 0
        assert totals(db) == (3, 6)
        assert not journal.path.exists()
    finally:
        db.close()


def test_close_counts_the_records_lost_when_the_journal_cannot_be_written_either(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = storage.open()
    (tmp_path / "a-file").write_text("")
    journal = UsageJournal(tmp_path / "a-file" / "usage-journal.jsonl")  # ENOTDIR, even for root
    try:

        async def shutdown() -> int:
            ledger = UsageLedger(db, flush_interval_s=60, journal=journal)
            for i in range(7):
                ledger.record(rec(i + 1))
            return await ledger.close(deadline=time.monotonic() + 0.2)

        with table_away(db):
            assert asyncio.run(shutdown()) == 7
        lost = [r.getMessage() for r in caplog.records if "LOST" in r.getMessage()]
        assert len(lost) == 1 and lost[0].startswith("usage ledger: 7 usage records LOST in this run")
    finally:
        db.close()


def test_records_beyond_the_memory_bound_go_to_the_journal_and_in_once_the_database_is_back(
    storage: Storage, tmp_path: Path
) -> None:
    db = storage.open()
    journal = UsageJournal(tmp_path / "usage-journal.jsonl")
    records = [rec(i + 1) for i in range(5)]
    try:

        async def scenario() -> None:
            ledger = UsageLedger(db, flush_interval_s=60, journal=journal, max_pending=3)
            for record in records:
                ledger.record(record)
            with table_away(db):
                with pytest.raises(Exception):  # noqa: B017, PT011 - SQLite and psycopg raise differently
                    await ledger.flush()
                assert ledger.pending == 3
                assert journal_lines(journal) == records[:2]  # the oldest, not dropped
                assert ledger.lost == 0
            assert await ledger.flush() == 3  # and the journal is replayed with it
            assert not journal.path.exists()
            assert await ledger.close(deadline=time.monotonic() + 5) == 0

        asyncio.run(scenario())
        assert totals(db) == (5, 15)
    finally:
        db.close()


def test_the_ledger_health_says_degraded_while_writes_fail_and_ok_once_one_succeeds(
    storage: Storage, tmp_path: Path
) -> None:
    db = storage.open()
    now = [1000.0]
    try:

        async def scenario() -> None:
            ledger = UsageLedger(
                db, flush_interval_s=60, journal=UsageJournal(tmp_path / "j"), clock=lambda: now[0]
            )
            assert (ledger.health.status, ledger.health.last_success, ledger.health.failures) == (
                "ok",
                1000.0,
                0,
            )
            ledger.record(rec(1))
            now[0] = 1010.0
            with table_away(db):
                for _ in range(2):
                    with pytest.raises(Exception):  # noqa: B017, PT011
                        await ledger.flush()
            assert (ledger.health.status, ledger.health.last_success, ledger.health.failures) == (
                "degraded",
                1000.0,
                2,
            )
            assert await ledger.flush() == 1
            assert (ledger.health.status, ledger.health.last_success, ledger.health.failures) == (
                "ok",
                1010.0,
                2,
            )

        asyncio.run(scenario())
    finally:
        db.close()
