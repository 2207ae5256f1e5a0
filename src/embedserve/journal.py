"""The usage journal: records the ledger could not write to the database (at shutdown, or beyond what it
holds in memory during an outage), appended to a local file as fsynced JSON lines, and replayed into the
ledger by the next start, exactly once: the database skips a record id it already has (design note 35)."""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embedserve.durable import fsync_dir, write_all
from embedserve.errors import ConfigError
from embedserve.types import UsageRecord

REPLAY_CHUNK = 10_000  # records per replay transaction
_TEXTS = ("key_id", "model", "request_id", "record_id")
_COUNTS = ("prompt_tokens", "inputs")
_NUMBERS = ("created_at", "latency_ms", "price_per_million")
_FIELDS = frozenset(_TEXTS + _COUNTS + _NUMBERS)
_OPTIONAL = frozenset({"batch_id"})  # a text or null; absent from the lines of a journal before batches


def encode_record(record: UsageRecord) -> bytes:
    """One journal line: the record's fields as a JSON object (floats round-trip exactly)."""
    return json.dumps(asdict(record), separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode_record(line: bytes) -> UsageRecord:
    """A journal line -> its record; ValueError for anything else (a line torn by a crash, an edit)."""
    doc: Any = json.loads(line)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(doc, dict) or not _FIELDS <= set(doc) <= _FIELDS | _OPTIONAL:
        raise ValueError("not a usage record")
    if not (doc.get("batch_id") is None or (isinstance(doc["batch_id"], str) and doc["batch_id"])):
        raise ValueError("batch_id is not a non-empty string or null")
    for name in _TEXTS:
        if not isinstance(doc[name], str) or not doc[name]:
            raise ValueError(f"{name} is not a non-empty string")
    for name in _COUNTS:
        if type(doc[name]) is not int or doc[name] < 0:
            raise ValueError(f"{name} is not a count")
    for name in _NUMBERS:
        if type(doc[name]) not in (int, float) or not math.isfinite(doc[name]):
            raise ValueError(f"{name} is not a number")
        doc[name] = float(doc[name])
    return UsageRecord(**doc)


@dataclass(frozen=True, slots=True)
class Replayed:
    records: int  # read from the journal
    new: int  # of those, the ones the ledger did not have yet
    rejected: int  # lines that were no record, kept in `<journal>.rejected`


class UsageJournal:
    """The journal file. Every access holds an exclusive flock on it, so processes sharing one (replicas
    with one data dir) never interleave a line, and a replay never removes a record appended meanwhile."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rejected_path = path.with_name(path.name + ".rejected")

    def check(self) -> None:
        """Blocking, at start: ConfigError unless the journal can be created and written, so that a bad
        path shows now rather than at the shutdown that needs it."""
        try:
            with self._locked(create=True) as fd:
                assert fd is not None
                if os.fstat(fd).st_size == 0:
                    os.unlink(self.path)
        except OSError as exc:
            raise ConfigError(f"cannot write the usage journal {self.path}: {exc}") from None

    def append(self, records: Sequence[UsageRecord]) -> None:
        """Blocking: append the records and fsync. All or nothing as far as the file system allows; raises
        OSError when the journal cannot be written."""
        if not records:
            return
        data = b"".join(map(encode_record, records))
        with self._locked(create=True) as fd:
            assert fd is not None
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a line torn by a crash must not swallow the first record after it
            try:
                write_all(fd, data)
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # best effort: no half-appended batch
                raise
            if size == 0:
                fsync_dir(self.path.parent)  # the new file's name survives a power cut too

    def replay(self, write: Callable[[Sequence[UsageRecord]], int], chunk: int = REPLAY_CHUNK) -> Replayed:
        """Blocking: hand every record to `write`, `chunk` at a time, then remove the journal. `write` must
        commit each chunk and skip the record ids the database already has (-> how many were new): a crash
        before the removal leaves the whole journal to be replayed again, and what was written counts
        once. With no journal, nothing happens."""
        with self._locked(create=False) as fd:
            if fd is None:
                return Replayed(0, 0, 0)
            records = new = 0
            batch: list[UsageRecord] = []
            rejected: list[bytes] = []
            with os.fdopen(os.dup(fd), "rb") as lines:  # the dup shares the lock; closing it keeps it
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        batch.append(decode_record(line))
                    except ValueError:
                        rejected.append(line.rstrip(b"\n") + b"\n")
                    if len(batch) >= chunk:
                        new, records, batch = new + write(batch), records + len(batch), []
            if batch:
                new, records = new + write(batch), records + len(batch)
            if rejected:
                self._keep(rejected)
            os.unlink(self.path)
            fsync_dir(self.path.parent)
            return Replayed(records, new, len(rejected))

    def _keep(self, lines: list[bytes]) -> None:
        fd = os.open(self.rejected_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, b"".join(lines))
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def _locked(self, *, create: bool) -> Iterator[int | None]:
        """The journal open and locked (-> its descriptor), or None when there is none and `create` is
        off. Opened again when another process replayed and removed it while this one waited."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        if create:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, flags, 0o600)
            except FileNotFoundError:
                if create:
                    raise
                fd = None
            if fd is None:
                yield None
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(fd, self.path):
                    yield fd
                    return
            finally:
                os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
