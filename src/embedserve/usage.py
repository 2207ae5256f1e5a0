"""The usage ledger: one record per embedded request, buffered and written in batches off the event loop
(to the journal when the database will not take them), and the reports read from it (design note 35)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass
from typing import Any, Literal, cast, get_args

from embedserve.db import Cursor, Database
from embedserve.errors import InvalidRequest, InvalidType
from embedserve.health import Health
from embedserve.journal import Replayed, UsageJournal
from embedserve.timestamps import END, RENDERED_START, iso, parse_time
from embedserve.types import UsageRecord

log = logging.getLogger("embedserve.usage")

GroupBy = Literal["key", "model", "day", "batch"]  # batch: a row per batch id (online: null)
MAX_PENDING = 1_000_000  # records held while the database is unreachable (about 200 MB); then the journal
RETRY_PAUSE_S = (0.05, 1.0)  # shutdown retries: the first pause, doubled up to the second
FIRST_TRY_S = 1.0  # the shutdown's first write may take this long even when the drain used the grace
_INSERT = (
    "INSERT INTO usage_records (key_id, model, prompt_tokens, inputs, request_id, created_at, "
    "latency_ms, price_per_million, record_id, batch_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (record_id) DO NOTHING"
)


def insert_records(tx: Cursor, records: Sequence[UsageRecord]) -> int:
    """In the caller's transaction (a batch's progress commits its lines' usage with it). A record whose
    id the ledger already has is skipped. -> how many were new."""
    if not records:
        return 0
    return tx.executemany(_INSERT, [astuple(record) for record in records])


def write_records(db: Database, records: Sequence[UsageRecord]) -> int:
    """Blocking: one transaction for the whole batch. A record whose id the ledger already has is skipped:
    a retry of a write that committed unseen, or a journal replayed again. -> how many were new."""
    with db.transaction() as tx:
        return insert_records(tx, records)


def replay_journal(db: Database, journal: UsageJournal) -> Replayed:
    """Blocking: the journal's records into the ledger, once (see UsageJournal.replay)."""
    replayed = journal.replay(lambda records: write_records(db, records))
    if replayed.records:
        log.info(
            "usage ledger: replayed %d records from the journal %s (%d new, %d already written)",
            replayed.records,
            journal.path,
            replayed.new,
            replayed.records - replayed.new,
        )
    if replayed.rejected:
        log.error(
            "usage ledger: %d lines of the journal %s were no usage record; kept in %s",
            replayed.rejected,
            journal.path,
            journal.rejected_path,
        )
    return replayed


class UsageLedger:
    """`record()` appends on the event loop (no I/O); `run()` writes the pending records every
    `flush_interval_s` in a worker thread; `close()` writes what is left, or journals it."""

    def __init__(
        self,
        db: Database,
        flush_interval_s: float,
        journal: UsageJournal,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._interval = flush_interval_s
        self._journal = journal
        self._max_pending = max_pending
        self._clock = clock
        self._pending: list[UsageRecord] = []
        self._writing: Sequence[UsageRecord] = ()  # the batch a write in a thread holds
        self._journaled = False  # records went to the journal in this run: replay it once writes work
        self._lock = asyncio.Lock()
        #: A success: a flush that left nothing waiting. Failing: records wait for the database.
        self.health = Health(last_success=clock())
        self.lost = 0  # records neither the database nor the journal took

    @property
    def pending(self) -> int:
        """Records not written yet (waiting, or in the write under way)."""
        return len(self._pending) + len(self._writing)

    def record(self, record: UsageRecord) -> None:
        self._pending.append(record)

    async def flush(self) -> int:
        """Write every pending record. -> how many. On failure they stay pending for the next try, beyond
        `max_pending` the oldest go to the journal. Shielded: a caller cancelled mid-write (the flusher at
        shutdown) leaves the write to finish and its outcome decides, so a batch is never both written and
        put back to be written again."""
        return await asyncio.shield(self._flush())

    async def _flush(self) -> int:
        async with self._lock:
            batch, self._pending = self._pending, []
            self._writing = batch
            try:
                if batch:
                    await asyncio.to_thread(write_records, self._db, batch)
                if self._journaled:  # the database is back: what the overflow journaled goes in too
                    await asyncio.to_thread(replay_journal, self._db, self._journal)
                    self._journaled = False
            except Exception as exc:
                # Should only the journal's replay have failed, the batch is written again: its record
                # ids make that harmless.
                self._writing = ()
                self._pending[:0] = batch
                if self.health.failed():
                    log.error(
                        "usage ledger: cannot write %d records, keeping them to retry: %s",
                        len(self._pending),
                        exc,
                    )
                await self._spill()
                raise
            finally:
                self._writing = ()
            if self.health.succeeded(self._clock()):
                log.info("usage ledger: writing again")
            return len(batch)

    async def _spill(self) -> None:
        """Beyond `max_pending`, the oldest records go to the journal (lost only if it fails too)."""
        excess = len(self._pending) - self._max_pending
        if excess <= 0:
            return
        oldest = self._pending[:excess]
        try:
            await asyncio.to_thread(self._journal.append, oldest)
        except OSError as exc:
            self.lost += excess
            log.error(
                "usage ledger: %d usage records LOST: the database is unreachable and the journal "
                "%s cannot be written: %s",
                excess,
                self._journal.path,
                exc,
            )
        else:
            self._journaled = True
            log.warning(
                "usage ledger: %d records moved to the journal %s (the database has been "
                "unreachable too long)",
                excess,
                self._journal.path,
            )
        del self._pending[:excess]

    async def run(self) -> None:
        """Flush every interval until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            with contextlib.suppress(Exception):  # logged by flush(); the records wait for the next round
                await self.flush()

    async def close(self, deadline: float) -> int:
        """Clean shutdown: write everything pending, retrying with backoff until `deadline` (monotonic
        seconds; the first try gets FIRST_TRY_S at least, so that a drain that used the whole grace does
        not send a working database's records to the journal). Then append what is still pending to the
        journal, with the batch of a write still under way (should that write commit after all, the
        replay skips its records). -> the records lost in this run, 0 unless the journal failed too."""
        self._journaled = False  # the next start replays the journal: no retrying that until the deadline
        pause, least = RETRY_PAUSE_S[0], FIRST_TRY_S
        while True:
            attempt = asyncio.ensure_future(self.flush())
            await asyncio.wait([attempt], timeout=max(deadline - time.monotonic(), least))
            if attempt.done() and attempt.exception() is None:
                if attempt.result():
                    log.info("usage ledger: wrote the last %d records", attempt.result())
                return self._report_lost()
            if not attempt.done() or time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(pause, deadline - time.monotonic()))
            pause, least = min(pause * 2, RETRY_PAUSE_S[1]), RETRY_PAUSE_S[0]
        records = [*self._writing, *self._pending]
        self._pending, self._writing = [], ()
        if not records:
            return self._report_lost()
        try:
            await asyncio.to_thread(self._journal.append, records)
        except OSError as exc:
            self.lost += len(records)
            log.error(
                "usage ledger: %d usage records LOST in this run: the database (%s) and the journal "
                "%s both failed: %s",
                self.lost,
                self._db.where,
                self._journal.path,
                exc,
            )
            return self.lost
        log.warning(
            "usage ledger: %d records the database (%s) would not take were written to the journal "
            "%s; the next start replays them",
            len(records),
            self._db.where,
            self._journal.path,
        )
        return self._report_lost()

    def _report_lost(self) -> int:
        if self.lost:
            log.error(
                "usage ledger: %d usage records LOST in this run: the journal %s could not be "
                "written during the outage",
                self.lost,
                self._journal.path,
            )
        return self.lost


# ---- reports --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageQuery:
    key: str | None = None
    model: str | None = None
    since: float | None = None  # inclusive, unix seconds
    until: float | None = None  # exclusive
    group_by: GroupBy | None = None


QUERY_PARAMS = ("key", "model", "since", "until", "group_by")


def parse_query(params: Mapping[str, object]) -> UsageQuery:
    """GET /v1/usage parameters (and the CLI's flags) -> UsageQuery, or a 400 naming the parameter."""
    unknown = sorted(set(params) - set(QUERY_PARAMS))
    if unknown:
        raise InvalidRequest(
            f"Unknown parameter '{unknown[0]}'; expected some of {', '.join(QUERY_PARAMS)}.", param=unknown[0]
        )
    values: dict[str, str | None] = {}
    for name in QUERY_PARAMS:
        value = params.get(name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidType(f"'{name}' must be a non-empty string.", param=name)
        values[name] = value
    group_by = values["group_by"]
    if group_by is not None and group_by not in get_args(GroupBy):
        raise InvalidRequest(
            f"'group_by' must be one of {', '.join(get_args(GroupBy))}; got {group_by!r}.", param="group_by"
        )
    since = None if values["since"] is None else parse_time(values["since"], "since")
    until = None if values["until"] is None else parse_time(values["until"], "until")
    if since is not None and until is not None and until <= since:
        raise InvalidRequest("'until' must be later than 'since'.", param="until")
    return UsageQuery(
        key=values["key"],
        model=values["model"],
        since=since,
        until=until,
        group_by=cast(GroupBy | None, group_by),
    )


def _day_sql(db: Database) -> str:
    """The UTC day of `u.created_at`, total like timestamps.iso(): a time past the years 1..9999 (which
    only a row written by hand could hold) is the nearest end of them, NaN (PostgreSQL only) NULL,
    where PostgreSQL's to_timestamp would fail the whole report and SQLite's strftime give NULL."""
    if db.dialect == "postgresql":
        nan = "u.created_at = 'NaN'"
        day = "to_char(to_timestamp(u.created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    else:
        nan = "0 = 1"  # SQLite stores a NaN as NULL
        day = "strftime('%Y-%m-%d', u.created_at, 'unixepoch')"
    return (
        f"CASE WHEN {nan} THEN NULL WHEN u.created_at < {RENDERED_START:.0f} THEN '0001-01-01' "
        f"WHEN u.created_at >= {END:.0f} THEN '9999-12-31' ELSE {day} END"
    )


def report(db: Database, query: UsageQuery) -> dict[str, Any]:
    """Blocking. The one JSON shape of a usage report (CLI --json and GET /v1/usage): rows per group
    (none without group_by) and the total. Cost = tokens x each record's price per million / 10^6."""
    where: list[str] = []
    params: list[Any] = []
    for column, value, op in (
        ("key_id", query.key, "="),
        ("model", query.model, "="),
        ("created_at", query.since, ">="),
        ("created_at", query.until, "<"),
    ):
        if value is not None:
            where.append(f"u.{column} {op} ?")
            params.append(value)
    group_sql, group_cols = {
        None: ("", []),
        "key": ("u.key_id", ["key_id", "key_name", "key_prefix"]),
        "model": ("u.model", ["model"]),
        "day": (_day_sql(db), ["day"]),
        "batch": ("u.batch_id", ["batch_id"]),
    }[query.group_by]
    extra = ", MAX(k.name), MAX(k.prefix)" if query.group_by == "key" else ""
    # Online records have no batch: their row (null) comes first in both dialects.
    order = f"{group_sql} IS NOT NULL, {group_sql}" if query.group_by == "batch" else group_sql
    select = f"{group_sql}{extra}, " if group_sql else ""
    sql = (
        f"SELECT {select}COUNT(*), SUM(u.inputs), SUM(u.prompt_tokens), "
        "SUM(u.prompt_tokens * u.price_per_million) FROM usage_records u "
        + ("LEFT JOIN api_keys k ON k.id = u.key_id " if query.group_by == "key" else "")
        + (f"WHERE {' AND '.join(where)} " if where else "")
        + (f"GROUP BY {group_sql} ORDER BY {order}" if group_sql else "")
    )
    with db.transaction(write=False) as tx:
        rows = tx.fetchall(sql, params)
    data: list[dict[str, Any]] = []
    total = {"requests": 0, "inputs": 0, "prompt_tokens": 0, "cost": 0.0}
    for row in rows:
        groups, (requests, inputs, tokens, micro_cost) = row[: len(group_cols)], row[len(group_cols) :]
        entry = {
            "requests": int(requests or 0),
            "inputs": int(inputs or 0),
            "prompt_tokens": int(tokens or 0),
            "cost": float(micro_cost or 0) / 1_000_000,
        }
        for name in ("requests", "inputs", "prompt_tokens", "cost"):
            total[name] += entry[name]
        if group_cols:
            data.append({**dict(zip(group_cols, groups, strict=True)), **entry})
    return {
        "object": "usage_report",
        "group_by": query.group_by,
        "filters": {
            "key": query.key,
            "model": query.model,
            "since": iso(query.since),
            "until": iso(query.until),
        },
        "data": data,
        "total": total,
    }


def render_table(doc: Mapping[str, Any]) -> str:
    """The report as a plain-text table, a TOTAL line last."""
    group_cols = {
        None: [],
        "key": ["key_id", "key_name"],
        "model": ["model"],
        "day": ["day"],
        "batch": ["batch_id"],
    }[doc["group_by"]]
    labels = len(group_cols) or 1
    header = ([c.upper() for c in group_cols] or [""]) + ["REQUESTS", "INPUTS", "PROMPT_TOKENS", "COST"]

    def cells(entry: Mapping[str, Any], label: list[str]) -> list[str]:
        return [
            *label,
            str(entry["requests"]),
            str(entry["inputs"]),
            str(entry["prompt_tokens"]),
            f"{entry['cost']:.6f}",
        ]

    lines = [cells(row, ["-" if row[c] is None else str(row[c]) for c in group_cols]) for row in doc["data"]]
    lines.append(cells(doc["total"], ["TOTAL"] + [""] * (labels - 1)))
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < labels else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    return "\n".join(fmt(line) for line in [header, *lines])
