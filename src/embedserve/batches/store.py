"""Batches and their per-line progress in the database (SQLite or PostgreSQL): what the API shows, what the
runner resumes from. Each change of a batch is one transaction; a commit of lines writes their states,
the batch's counters, the committed lengths of its files and the lines' usage records together, so that
a line is billed exactly when it counts as done (design note 48). Blocking: callers use threads."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from embedserve.batches.lines import RequestLine
from embedserve.batches.records import TIMESTAMPS, UNFINISHED, BatchError, BatchRecord, BatchStatus
from embedserve.db import Cursor, Database
from embedserve.errors import BatchNotFound, Conflict, FileNotFound
from embedserve.types import Principal, UsageRecord
from embedserve.usage import insert_records

_COLUMNS = (
    "id, owner, status, endpoint, input_file_id, completion_window, metadata, created_at, expires_at, "
    "model, errors, output_file_id, error_file_id, output_bytes, error_bytes, total, completed, failed, "
    "input_tokens, queued_tokens, " + ", ".join(TIMESTAMPS)
)
_UNFINISHED_SQL = ", ".join(f"'{status}'" for status in UNFINISHED)


def _record(row: Sequence[Any]) -> BatchRecord:
    (id_, owner, status, endpoint, input_file_id, window, metadata, created_at, expires_at, model, errors,
     output_file_id, error_file_id, output_bytes, error_bytes, total, completed, failed, input_tokens,
     queued_tokens, *stamps) = row  # fmt: skip
    return BatchRecord(
        id=id_,
        owner=owner,
        status=cast(BatchStatus, status),
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=window,
        metadata=None if metadata is None else json.loads(metadata),
        created_at=int(created_at),
        expires_at=int(expires_at),
        model=model,
        errors=tuple(BatchError(**e) for e in json.loads(errors)) if errors else (),
        output_file_id=output_file_id,
        error_file_id=error_file_id,
        output_bytes=int(output_bytes),
        error_bytes=int(error_bytes),
        total=int(total),
        completed=int(completed),
        failed=int(failed),
        input_tokens=int(input_tokens),
        queued_tokens=int(queued_tokens),
        **{
            name: None if value is None else int(value)
            for name, value in zip(TIMESTAMPS, stamps, strict=True)
        },
    )


@dataclass(frozen=True, slots=True)
class LineDone:
    """A line that ran: `completed` (its output line went to the output file) or `failed` (the error
    file); its tokens and usage record when it was embedded."""

    line: int
    state: str  # "completed" | "failed"
    token_bound: int
    tokens: int = 0
    usage: UsageRecord | None = None


class BatchStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    def _now(self) -> int:
        return int(self._clock())

    @staticmethod
    def _one(tx: Cursor, batch_id: str) -> BatchRecord | None:
        rows = tx.fetchall(f"SELECT {_COLUMNS} FROM batches WHERE id = ?", (batch_id,))
        return _record(rows[0]) if rows else None

    # ---- what the API reads and changes --------------------------------------------------------

    def create(
        self,
        *,
        batch_id: str,
        owner: str,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str] | None,
        window_s: float,
    ) -> BatchRecord:
        now = self._now()
        # FOR SHARE (PostgreSQL): a delete of the input file (FOR UPDATE) waits for this batch and then
        # finds it unfinished, or this finds no file. SQLite's write transactions are serial already.
        lock = " FOR SHARE" if self._db.dialect == "postgresql" else ""
        with self._db.transaction() as tx:
            if not tx.fetchall(f"SELECT id FROM files WHERE id = ?{lock}", (input_file_id,)):
                raise FileNotFound(f"No such File object: {input_file_id}", param="input_file_id")
            tx.execute(
                "INSERT INTO batches (id, owner, status, endpoint, input_file_id, completion_window, "
                "metadata, created_at, expires_at, output_bytes, error_bytes, total, completed, failed, "
                "input_tokens, queued_tokens) "
                "VALUES (?, ?, 'validating', ?, ?, ?, ?, ?, ?, 0, 0, 0, 0, 0, 0, 0)",
                (
                    batch_id,
                    owner,
                    endpoint,
                    input_file_id,
                    completion_window,
                    None if metadata is None else json.dumps(dict(metadata)),
                    now,
                    int(now + window_s),
                ),
            )
            record = self._one(tx, batch_id)
        assert record is not None
        return record

    def get(self, batch_id: str, principal: Principal) -> BatchRecord:
        """The batch, if `principal` owns it or is an admin; BatchNotFound otherwise (never a 403: another
        key's batch ids are not confirmed to exist)."""
        with self._db.transaction(write=False) as tx:
            record = self._one(tx, batch_id)
        if record is None or not (principal.admin or record.owner == principal.key_id):
            raise BatchNotFound(f"No such batch: {batch_id[:80]}")
        return record

    def page(
        self, principal: Principal | None, *, after: str | None, limit: int
    ) -> tuple[list[BatchRecord], bool]:
        """Newest first, after the batch `after` (a cursor: its id); `principal` None or an admin sees
        every key's. -> (a page, whether more follow)."""
        where, params = [], []
        if principal is not None and not principal.admin:
            where.append("owner = ?")
            params.append(principal.key_id)
        if after is not None:
            where.append("id < ?")
            params.append(after)
        sql = f"SELECT {_COLUMNS} FROM batches " + (f"WHERE {' AND '.join(where)} " if where else "")
        with self._db.transaction(write=False) as tx:
            rows = tx.fetchall(sql + "ORDER BY id DESC LIMIT ?", [*params, limit + 1])
        return [_record(row) for row in rows[:limit]], len(rows) > limit

    def cancel(self, batch_id: str, principal: Principal | None) -> BatchRecord:
        """validating or in_progress -> cancelling (the runner stops taking its lines and ends it
        `cancelled`); a batch already cancelling or cancelled is answered as it is; one that has ended
        otherwise is a Conflict. `principal` None: an operator (the CLI)."""
        with self._db.transaction() as tx:
            record = self._one(tx, batch_id)
            if record is None or not (
                principal is None or principal.admin or record.owner == principal.key_id
            ):
                raise BatchNotFound(f"No such batch: {batch_id[:80]}")
            if record.status in ("cancelling", "cancelled"):
                return record
            if record.status not in ("validating", "in_progress"):
                raise Conflict(f"Cannot cancel a batch with status {record.status!r}.")
            tx.execute(
                "UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ?",
                (self._now(), batch_id),
            )
            changed = self._one(tx, batch_id)
        assert changed is not None
        return changed

    def queued_tokens(self, owner: str) -> int:
        """The token bound of the lines the key's unfinished batches have still to run."""
        with self._db.transaction(write=False) as tx:
            ((total,),) = tx.fetchall(
                f"SELECT COALESCE(SUM(queued_tokens), 0) FROM batches WHERE owner = ? AND status IN "
                f"({_UNFINISHED_SQL})",
                (owner,),
            )
        return int(total)

    # ---- what the runner reads and changes -----------------------------------------------------

    def load(self, batch_id: str) -> BatchRecord | None:
        with self._db.transaction(write=False) as tx:
            return self._one(tx, batch_id)

    def next_unfinished(self) -> BatchRecord | None:
        """The oldest batch with work left: batches run one after another, in the order they came."""
        with self._db.transaction(write=False) as tx:
            rows = tx.fetchall(
                f"SELECT {_COLUMNS} FROM batches WHERE status IN ({_UNFINISHED_SQL}) ORDER BY id LIMIT 1"
            )
        return _record(rows[0]) if rows else None

    def fail(self, batch_id: str, errors: Sequence[BatchError]) -> None:
        """Validation found errors: the batch is `failed` with them, and runs no line."""
        doc = json.dumps(
            [{"code": e.code, "message": e.message, "line": e.line, "param": e.param} for e in errors]
        )
        with self._db.transaction() as tx:
            tx.execute(
                "UPDATE batches SET status = 'failed', failed_at = ?, errors = ?, queued_tokens = 0 "
                f"WHERE id = ? AND status IN ({_UNFINISHED_SQL})",
                (self._now(), doc, batch_id),
            )

    def start(
        self,
        batch_id: str,
        requests: Sequence[RequestLine],
        *,
        model: str | None,
        output_file_id: str,
        error_file_id: str,
    ) -> None:
        """Validated: its lines become pending and the batch `in_progress` (unless it is being
        cancelled: then its lines are written off as cancelled by the runner)."""
        with self._db.transaction() as tx:
            tx.executemany(
                "INSERT INTO batch_requests (batch_id, line, custom_id, byte_offset, byte_length, inputs, "
                "token_bound, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')",
                [
                    (batch_id, r.line, r.custom_id, r.offset, r.length, r.inputs, r.token_bound)
                    for r in requests
                ],
            )
            tx.execute(
                "UPDATE batches SET model = ?, output_file_id = ?, error_file_id = ?, total = ?, "
                "queued_tokens = ? WHERE id = ?",
                (
                    model,
                    output_file_id,
                    error_file_id,
                    len(requests),
                    sum(r.token_bound for r in requests),
                    batch_id,
                ),
            )
            tx.execute(
                "UPDATE batches SET status = 'in_progress', in_progress_at = ? "
                "WHERE id = ? AND status = 'validating'",
                (self._now(), batch_id),
            )

    def pending(self, batch_id: str) -> list[RequestLine]:
        """The lines not yet done, in file order."""
        with self._db.transaction(write=False) as tx:
            rows = tx.fetchall(
                "SELECT line, custom_id, byte_offset, byte_length, inputs, token_bound FROM batch_requests "
                "WHERE batch_id = ? AND state = 'pending' ORDER BY line",
                (batch_id,),
            )
        return [RequestLine(int(a), b, int(c), int(d), int(e), int(f)) for a, b, c, d, e, f in rows]

    def commit(
        self, batch_id: str, done: Sequence[LineDone], *, output_bytes: int, error_bytes: int
    ) -> BatchStatus:
        """The lines whose output is on disk (up to the files' new committed lengths), in one transaction
        with their usage records. -> the batch's status now (a cancel may have come meanwhile)."""
        completed = sum(1 for d in done if d.state == "completed")
        with self._db.transaction() as tx:
            if done:
                tx.executemany(
                    "UPDATE batch_requests SET state = ? "
                    "WHERE batch_id = ? AND line = ? AND state = 'pending'",
                    [(d.state, batch_id, d.line) for d in done],
                )
            tx.execute(
                "UPDATE batches SET completed = completed + ?, failed = failed + ?, "
                "input_tokens = input_tokens + ?, queued_tokens = queued_tokens - ?, output_bytes = ?, "
                "error_bytes = ? WHERE id = ?",
                (
                    completed,
                    len(done) - completed,
                    sum(d.tokens for d in done),
                    sum(d.token_bound for d in done),
                    output_bytes,
                    error_bytes,
                    batch_id,
                ),
            )
            insert_records(tx, [d.usage for d in done if d.usage is not None])
            rows = tx.fetchall("SELECT status FROM batches WHERE id = ?", (batch_id,))
        return cast(BatchStatus, rows[0][0])

    def finalizing(self, batch_id: str) -> None:
        with self._db.transaction() as tx:
            tx.execute(
                "UPDATE batches SET status = 'finalizing', finalizing_at = ? "
                "WHERE id = ? AND status = 'in_progress'",
                (self._now(), batch_id),
            )

    def finish(self, batch_id: str, status: BatchStatus) -> None:
        """completed, cancelled or expired: its timestamp set, nothing left queued, its progress rows
        dropped (the output and error files hold every line now)."""
        column = f"{status}_at"
        assert status in ("completed", "cancelled", "expired")
        with self._db.transaction() as tx:
            tx.execute(
                f"UPDATE batches SET status = ?, {column} = ?, queued_tokens = 0 WHERE id = ?",
                (status, self._now(), batch_id),
            )
            tx.execute("DELETE FROM batch_requests WHERE batch_id = ?", (batch_id,))

    def sweep(self, now: float, keep_s: float) -> int:
        """Remove the batches that ended more than `keep_s` ago (their files expire with them). -> how
        many."""
        cutoff = now - keep_s
        ended = "COALESCE(completed_at, failed_at, expired_at, cancelled_at)"
        with self._db.transaction() as tx:
            return tx.execute(
                f"DELETE FROM batches WHERE status NOT IN ({_UNFINISHED_SQL}) AND {ended} < ?", (cutoff,)
            )
