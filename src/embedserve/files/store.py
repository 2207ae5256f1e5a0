"""FileStore: uploaded files and batch outputs, bytes in a directory (`root/<id>`) and metadata in the
database's `files` table. An upload is streamed to `root/<id>.part` as it arrives and becomes a file only
whole: past the size limit, down to the disk's reserve, or failing in any way, nothing of it is left."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedserve.batches.records import UNFINISHED
from embedserve.db import Cursor, Database
from embedserve.durable import fsync_dir, write_all
from embedserve.errors import ConfigError, Conflict, FileNotFound, InsufficientStorage, PayloadTooLarge
from embedserve.files.records import (
    MAX_LIST_LIMIT,
    FileRecord,
    Order,
    check_purpose,
    is_file_id,
    new_file_id,
)
from embedserve.types import Principal

log = logging.getLogger("embedserve.files")

_COLUMNS = "id, owner, filename, purpose, bytes, created_at, expires_at"
#: A batch in one of these still reads its input file: the file may be neither deleted nor swept.
_UNFINISHED_SQL = "(" + ", ".join(f"'{status}'" for status in UNFINISHED) + ")"  # a batch reads its input
#: Bytes gathered before one write (and one free-space check) in a thread: few thread hops per upload,
#: and at most this much of it in memory.
WRITE_BYTES = 1 << 20
#: A `.part` file, or a data file that no row names, untouched this long is a crash's leftover.
STRAY_AGE_S = 3600.0
PART_SUFFIX = ".part"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_IN_CHUNK = 500  # ids per `IN (...)` when the sweep asks which data files rows name


def _record(row: Sequence[Any]) -> FileRecord:
    ident, owner, filename, purpose, size, created_at, expires_at = row
    return FileRecord(
        id=ident,
        owner=owner,
        filename=filename,
        purpose=purpose,
        bytes=int(size),
        created_at=int(created_at),
        expires_at=None if expires_at is None else int(expires_at),
    )


def _not_found(file_id: str) -> FileNotFound:
    return FileNotFound(f"No such File object: {file_id[:64]}", param="id")


def _disk_full(limit: int | None = None) -> InsufficientStorage:
    reserve = "" if limit is None else f" (the server keeps {limit} bytes free)"
    return InsufficientStorage(
        f"The server has no room left for this file{reserve}; nothing of it was kept. Retry later, or "
        "delete files you no longer need.",
        param="file",
    )


class _Part:
    """An upload's `.part` file while it is written. Its calls run in threads; the lock makes `remove` wait
    for a write still running in another thread (an upload cancelled mid-write) before closing the fd."""

    def __init__(self, path: Path, min_free: int) -> None:
        self.path = path
        self._min_free = min_free
        self._lock = threading.Lock()
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno in _FULL:
                raise _disk_full() from None
            raise

    def write(self, data: bytearray) -> None:
        with self._lock:
            if self._min_free:
                stats = os.fstatvfs(self._fd)
                if stats.f_bavail * stats.f_frsize - len(data) < self._min_free:
                    raise _disk_full(self._min_free)
            try:
                write_all(self._fd, data)
            except OSError as exc:
                if exc.errno in _FULL:
                    raise _disk_full() from None
                raise

    def finish(self) -> None:
        """Synced and closed: what follows (the rename) never exposes a file whose bytes are not on disk."""
        with self._lock:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                if exc.errno in _FULL:  # (a file system that allocates at sync: NFS, some quotas)
                    raise _disk_full() from None
                raise
            finally:
                os.close(self._fd)
                self._fd = -1

    def remove(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Received:
    """An upload's bytes, whole and synced in `part`, that are not a file of the store yet: `commit` makes
    them one, `discard` removes them."""

    id: str
    created_at: int
    part: Path
    bytes: int


class FileStore:
    """Files under `root`, metadata in `db`. `upload`/`receive` are async (their blocking I/O runs in
    threads); the rest is blocking, to be run in a thread from async code."""

    def __init__(
        self,
        db: Database,
        root: Path,
        *,
        max_bytes: int,
        min_free: int,
        expiry_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Creates `root` (mode 0700) when it is missing."""
        self._db = db
        self.root = root
        self.max_bytes = max_bytes
        self.min_free = min_free
        self.expiry_s = expiry_s
        self._clock = clock
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the files directory {root}: {exc}") from None

    def path(self, file_id: str) -> Path:
        """Where a file's bytes are (the batch worker writes its outputs here before `register`)."""
        if not is_file_id(file_id):  # never a path outside root, whatever the caller passes
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / file_id

    def new_record(
        self,
        file_id: str,
        owner: str,
        filename: str,
        purpose: str,
        size: int,
        *,
        created_at: int | None = None,
        expires_after_s: int | None = None,
    ) -> FileRecord:
        """The record of a file made at `created_at` (default: now, by the store's clock), expiring after
        the server's --file-expiry (or `expires_after_s`, when that is sooner)."""
        created = int(self._clock()) if created_at is None else created_at
        expiry = self.expiry_s if expires_after_s is None else min(float(expires_after_s), self.expiry_s)
        return FileRecord(
            id=file_id,
            owner=owner,
            filename=filename,
            purpose=purpose,
            bytes=size,
            created_at=created,
            expires_at=int(created + expiry),
        )

    # ---- uploads ------------------------------------------------------------------------------------

    async def upload(
        self, owner: str, filename: str, purpose: str, chunks: AsyncIterator[bytes]
    ) -> FileRecord:
        """Store `chunks` as a new file of `owner`. PayloadTooLarge as soon as they pass `max_bytes`,
        InsufficientStorage when a write would leave less than `min_free` on the disk or finds it full;
        on any failure (the client leaving included) nothing of the upload is left."""
        check_purpose(purpose)
        received = await self.receive(chunks)
        return await asyncio.to_thread(self.commit, received, owner, filename, purpose)

    async def receive(self, chunks: AsyncIterator[bytes]) -> Received:
        """The first half of `upload`, for a form whose other fields may come after the file: the bytes,
        synced in a `.part` file that is not a file of the store until `commit`."""
        file_id, created = new_file_id(), int(self._clock())  # one instant: id order is creation order
        part = await asyncio.to_thread(_Part, self.root / f"{file_id}{PART_SUFFIX}", self.min_free)
        size = 0
        pending = bytearray()
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise PayloadTooLarge(
                        f"The file is larger than the server's limit of {self.max_bytes} bytes; nothing of "
                        "it was kept.",
                        param="file",
                    )
                pending += chunk
                if len(pending) >= WRITE_BYTES:
                    data, pending = pending, bytearray()
                    await asyncio.to_thread(part.write, data)
            if pending:
                await asyncio.to_thread(part.write, pending)
            await asyncio.to_thread(part.finish)
        except BaseException:
            # Shielded: a second cancellation cannot leave the part behind (the removal runs on).
            removal = asyncio.ensure_future(asyncio.to_thread(part.remove))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(removal)
            raise
        return Received(id=file_id, created_at=created, part=part.path, bytes=size)

    def commit(
        self,
        received: Received,
        owner: str,
        filename: str,
        purpose: str,
        *,
        expires_after_s: int | None = None,
    ) -> FileRecord:
        """`received` becomes the file `received.id`: renamed into place, the rename synced, the row
        inserted. If any step fails, the bytes are removed."""
        record = self.new_record(
            received.id,
            owner,
            filename,
            purpose,
            received.bytes,
            created_at=received.created_at,
            expires_after_s=expires_after_s,
        )
        final = self.path(received.id)
        try:
            os.rename(received.part, final)
            fsync_dir(self.root)
            with self._db.transaction() as tx:
                self._insert(tx, record)
        except BaseException as exc:
            received.part.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in _FULL:
                raise _disk_full() from None
            raise
        return record

    def discard(self, received: Received) -> None:
        received.part.unlink(missing_ok=True)

    # ---- the batch worker's outputs -----------------------------------------------------------------

    def register(self, record: FileRecord) -> None:
        """Insert the row of a file already written at path(record.id). Idempotent: a worker that
        registers again after a crash changes nothing."""
        self.path(record.id)  # (checks the id)
        with self._db.transaction() as tx:
            self._insert(tx, record, if_new=True)

    @staticmethod
    def _insert(tx: Cursor, record: FileRecord, *, if_new: bool = False) -> None:
        tx.execute(
            f"INSERT INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            + (" ON CONFLICT (id) DO NOTHING" if if_new else ""),
            (
                record.id,
                record.owner,
                record.filename,
                record.purpose,
                record.bytes,
                record.created_at,
                record.expires_at,
            ),
        )

    # ---- reads and deletes --------------------------------------------------------------------------

    def get(self, file_id: str, principal: Principal) -> FileRecord:
        """FileNotFound unless the file exists and is `principal`'s (an admin's: any)."""
        with self._db.transaction(write=False) as tx:
            return self._visible(tx, file_id, principal)

    def _visible(self, tx: Cursor, file_id: str, principal: Principal, *, lock: bool = False) -> FileRecord:
        # FOR UPDATE (PostgreSQL): a batch created meanwhile waits for the delete, then finds no file.
        # SQLite's write transactions are serial already.
        suffix = " FOR UPDATE" if lock and self._db.dialect == "postgresql" else ""
        rows = tx.fetchall(f"SELECT {_COLUMNS} FROM files WHERE id = ?{suffix}", (file_id,))
        if not rows:
            raise _not_found(file_id)
        record = _record(rows[0])
        if record.owner != principal.key_id and not principal.admin:
            raise _not_found(file_id)  # never "forbidden": another key's ids are not told apart
        return record

    def delete(self, file_id: str, principal: Principal) -> FileRecord:
        """Remove a file: its row, then its bytes. Conflict while an unfinished batch reads it."""
        with self._db.transaction() as tx:
            record = self._visible(tx, file_id, principal, lock=True)
            batches = tx.fetchall(
                f"SELECT id FROM batches WHERE input_file_id = ? AND status IN {_UNFINISHED_SQL} "
                "ORDER BY id LIMIT 1",
                (file_id,),
            )
            if batches:
                raise Conflict(
                    f"File {file_id} is the input of batch {batches[0][0]}, which has not finished; cancel "
                    "the batch or wait for it to end before deleting the file.",
                    param="file_id",
                )
            tx.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.path(file_id).unlink(missing_ok=True)
        return record

    def sweep(self, now: float) -> int:
        """Remove what has expired by `now` (the store's clock): rows and bytes of files past `expires_at`
        that no unfinished batch reads; and what a crash left, untouched for STRAY_AGE_S: `.part` files,
        and data files that no row and no batch's output or error file id names. -> files removed."""
        with self._db.transaction() as tx:
            expired = [
                row[0]
                for row in tx.fetchall(
                    "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? AND id NOT IN "
                    f"(SELECT input_file_id FROM batches WHERE status IN {_UNFINISHED_SQL})",
                    (now,),
                )
            ]
            tx.executemany("DELETE FROM files WHERE id = ?", [(file_id,) for file_id in expired])
        for file_id in expired:
            self.path(file_id).unlink(missing_ok=True)
        strays = self._strays(now)
        if expired or strays:
            log.info("swept %d expired files and %d left by a crash", len(expired), len(strays))
        return len(expired) + len(strays)

    def _strays(self, now: float) -> builtins.list[str]:
        parts: builtins.list[Path] = []
        unnamed: dict[str, Path] = {}
        with os.scandir(self.root) as entries:
            for entry in entries:
                try:
                    old = now - entry.stat(follow_symlinks=False).st_mtime > STRAY_AGE_S
                except FileNotFoundError:  # (removed meanwhile)
                    continue
                if not old or not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name.endswith(PART_SUFFIX) and is_file_id(entry.name.removesuffix(PART_SUFFIX)):
                    parts.append(Path(entry.path))
                elif is_file_id(entry.name):
                    unnamed[entry.name] = Path(entry.path)
        names = list(unnamed)
        with self._db.transaction(write=False) as tx:
            for start in range(0, len(names), _IN_CHUNK):
                chunk = names[start : start + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                for (named,) in tx.fetchall(
                    f"SELECT id FROM files WHERE id IN ({marks}) UNION "
                    f"SELECT output_file_id FROM batches WHERE output_file_id IN ({marks}) UNION "
                    f"SELECT error_file_id FROM batches WHERE error_file_id IN ({marks})",
                    chunk * 3,
                ):
                    unnamed.pop(named, None)
        removed = [*parts, *unnamed.values()]
        for path in removed:
            path.unlink(missing_ok=True)
        return [path.name for path in removed]

    def list(
        self,
        principal: Principal,
        *,
        after: str | None = None,
        limit: int = MAX_LIST_LIMIT,
        order: Order = "desc",
        purpose: str | None = None,
    ) -> tuple[builtins.list[FileRecord], bool]:
        """A page of the files `principal` may see (an admin: all), by id (creation) order, after the id
        `after`. -> (the page, whether more follow)."""
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if not principal.admin:
            where.append("owner = ?")
            params.append(principal.key_id)
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        if after is not None:
            where.append("id < ?" if order == "desc" else "id > ?")
            params.append(after)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        with self._db.transaction(write=False) as tx:
            rows = tx.fetchall(
                f"SELECT {_COLUMNS} FROM files{clause} ORDER BY id {order.upper()} LIMIT ?",
                (*params, limit + 1),
            )
        return [_record(row) for row in rows[:limit]], len(rows) > limit
