"""The file store on a real database (SQLite and PostgreSQL where its SQL matters) and a real directory:
uploads are streamed and kept only whole (past the size limit, down to the disk's reserve, failing or
cancelled midway: nothing left), ownership hides other keys' files, pages come newest first by id,
a file an unfinished batch reads cannot be deleted, and the sweep removes what expired or a crash left."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conftest import Storage
from embedserve.db import Database, open_database
from embedserve.errors import (
    ConfigError,
    Conflict,
    FileNotFound,
    InsufficientStorage,
    InvalidRequest,
    PayloadTooLarge,
)
from embedserve.files import FileRecord, FileStore, file_json, is_file_id, new_file_id, parse_list_query
from embedserve.files.store import STRAY_AGE_S, WRITE_BYTES
from embedserve.types import Principal

ALICE = Principal(key_id="key_alice")
BOB = Principal(key_id="key_bob")
ADMIN = Principal(key_id="key_admin", admin=True)
NOW = 1_800_000_000.0
DAY = 86400.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_store(db: Database, root: Path, clock: Clock | None = None, **limits: int) -> FileStore:
    return FileStore(
        db,
        root,
        max_bytes=limits.get("max_bytes", 10 * WRITE_BYTES),
        min_free=limits.get("min_free", 0),
        expiry_s=30 * DAY,
        clock=clock or Clock(),
    )


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def upload(store: FileStore, owner: Principal, data: bytes, filename: str = "in.jsonl") -> FileRecord:
    return asyncio.run(store.upload(owner.key_id, filename, "batch", chunks_of(data)))


def leftovers(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


@pytest.fixture
def db(storage: Storage) -> Iterator[Database]:
    database = storage.open()
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Database]:
    """For what the database does not change: the bytes on disk."""
    database = open_database(None, tmp_path / "data")
    try:
        yield database
    finally:
        database.close()


def add_batch(
    db: Database, batch_id: str, input_file_id: str, status: str, output: str | None = None
) -> None:
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO batches (id, owner, status, endpoint, input_file_id, completion_window, "
            "output_file_id, output_bytes, error_bytes, total, completed, failed, input_tokens, "
            "queued_tokens, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, 0, 0, 0, 0, 0, ?, ?)",
            (batch_id, ALICE.key_id, status, "/v1/embeddings", input_file_id, "24h", output, NOW, NOW + DAY),
        )


# ---- uploads -------------------------------------------------------------------------------------


def test_an_upload_is_kept_whole_with_its_record_and_openais_file_object(
    db: Database, tmp_path: Path
) -> None:
    store = make_store(db, tmp_path / "files")
    data = b'{"custom_id": "a"}\n' * 100_000  # several writes
    record = upload(store, ALICE, data)
    assert is_file_id(record.id)
    assert store.path(record.id).read_bytes() == data
    assert leftovers(store.root) == [record.id]  # no .part left
    assert (store.root.stat().st_mode & 0o777, store.path(record.id).stat().st_mode & 0o777) == (0o700, 0o600)
    assert record == FileRecord(
        id=record.id,
        owner=ALICE.key_id,
        filename="in.jsonl",
        purpose="batch",
        bytes=len(data),
        created_at=int(NOW),
        expires_at=int(NOW + 30 * DAY),
    )
    assert store.get(record.id, ALICE) == record
    assert file_json(record) == {
        "id": record.id,
        "object": "file",
        "bytes": len(data),
        "created_at": int(NOW),
        "filename": "in.jsonl",
        "purpose": "batch",
        "expires_at": int(NOW + 30 * DAY),
        "status": "processed",
        "status_details": None,
    }


def test_an_upload_past_the_limit_is_413_as_soon_as_it_passes_and_leaves_nothing(
    sqlite: Database, tmp_path: Path
) -> None:
    store = make_store(sqlite, tmp_path / "files", max_bytes=3 * WRITE_BYTES)
    asked = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal asked
        while True:
            asked += 1
            yield b"x" * 65536

    with pytest.raises(PayloadTooLarge) as caught:
        asyncio.run(store.upload(ALICE.key_id, "big.jsonl", "batch", endless()))
    assert str(3 * WRITE_BYTES) in caught.value.message and caught.value.param == "file"
    assert asked == 3 * WRITE_BYTES // 65536 + 1  # not one chunk more than the one that passed it
    assert leftovers(store.root) == []
    assert store.list(ADMIN) == ([], False)


def test_an_upload_exactly_at_the_limit_is_kept(sqlite: Database, tmp_path: Path) -> None:
    store = make_store(sqlite, tmp_path / "files", max_bytes=1000)
    assert upload(store, ALICE, b"y" * 1000).bytes == 1000


def test_an_upload_that_would_eat_into_the_reserve_is_507_and_leaves_nothing(
    sqlite: Database, tmp_path: Path
) -> None:
    root = tmp_path / "files"
    root.mkdir()
    stats = os.statvfs(root)
    free = stats.f_bavail * stats.f_frsize
    # The reserve is just below what is free: the first megabyte would already pass it.
    store = make_store(sqlite, root, min_free=max(free - WRITE_BYTES // 2, 1))
    with pytest.raises(InsufficientStorage) as caught:
        upload(store, ALICE, b"z" * (2 * WRITE_BYTES))
    assert caught.value.headers()["Retry-After"].isdigit()
    assert leftovers(root) == []
    assert store.list(ADMIN) == ([], False)


def test_the_reserve_is_checked_as_the_upload_goes_not_only_at_its_end(
    sqlite: Database, tmp_path: Path
) -> None:
    """The upload's source is asked for no chunk past the first write that would pass the reserve."""
    root = tmp_path / "files"
    root.mkdir()
    stats = os.statvfs(root)
    store = make_store(sqlite, root, min_free=stats.f_bavail * stats.f_frsize + 1)  # above the free space
    asked = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal asked
        while True:
            asked += 1
            yield b"z" * 65536

    with pytest.raises(InsufficientStorage):
        asyncio.run(store.upload(ALICE.key_id, "f", "batch", endless()))
    assert asked == WRITE_BYTES // 65536  # the first write's worth, no more
    assert leftovers(root) == []


def test_an_upload_whose_source_fails_midway_leaves_nothing(sqlite: Database, tmp_path: Path) -> None:
    store = make_store(sqlite, tmp_path / "files")

    async def broken() -> AsyncIterator[bytes]:
        for _ in range(40):  # past several writes
            yield b"a" * 65536
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        asyncio.run(store.upload(ALICE.key_id, "f", "batch", broken()))
    assert leftovers(store.root) == []


def test_an_upload_cancelled_while_it_waits_for_bytes_leaves_nothing(
    sqlite: Database, tmp_path: Path
) -> None:
    store = make_store(sqlite, tmp_path / "files")
    parts: list[str] = []

    async def run() -> None:
        started = asyncio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b"b" * 65536
            started.set()
            await asyncio.Event().wait()  # the client sends nothing more
            yield b""

        task = asyncio.ensure_future(store.upload(ALICE.key_id, "f", "batch", stalled()))
        await started.wait()
        await asyncio.sleep(0.05)  # (the pending bytes reach their write)
        parts.extend(leftovers(store.root))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert len(parts) == 1 and parts[0].endswith(".part")  # it was being written as it came
    assert leftovers(store.root) == []


def test_an_upload_with_another_purpose_is_400_before_any_byte_is_kept(
    sqlite: Database, tmp_path: Path
) -> None:
    store = make_store(sqlite, tmp_path / "files")
    with pytest.raises(InvalidRequest) as caught:
        asyncio.run(store.upload(ALICE.key_id, "f", "fine-tune", chunks_of(b"x")))
    assert caught.value.param == "purpose" and "'batch'" in caught.value.message
    assert leftovers(store.root) == []


def test_a_commit_whose_insert_fails_removes_the_bytes(sqlite: Database, tmp_path: Path) -> None:
    store = make_store(sqlite, tmp_path / "files")
    received = asyncio.run(store.receive(chunks_of(b"data\n")))
    taken = store.new_record(received.id, BOB.key_id, "other", "batch", 1)
    store.register(taken)  # the id's row exists already: the insert fails
    store.path(received.id).unlink(missing_ok=True)
    with pytest.raises(Exception, match="UNIQUE constraint failed"):
        store.commit(received, ALICE.key_id, "f", "batch")
    assert leftovers(store.root) == []
    assert store.get(received.id, ADMIN) == taken


def test_a_received_upload_that_is_discarded_leaves_nothing(sqlite: Database, tmp_path: Path) -> None:
    store = make_store(sqlite, tmp_path / "files")
    received = asyncio.run(store.receive(chunks_of(b"a", b"b")))
    assert received.bytes == 2 and leftovers(store.root) == [f"{received.id}.part"]
    store.discard(received)
    assert leftovers(store.root) == []


def test_an_upload_may_ask_to_expire_sooner_than_the_server_but_not_later(
    sqlite: Database, tmp_path: Path
) -> None:
    store = make_store(sqlite, tmp_path / "files")
    soon = asyncio.run(store.receive(chunks_of(b"a")))
    late = asyncio.run(store.receive(chunks_of(b"b")))
    assert store.commit(soon, ALICE.key_id, "f", "batch", expires_after_s=3600).expires_at == int(NOW + 3600)
    capped = store.commit(late, ALICE.key_id, "f", "batch", expires_after_s=int(60 * DAY))
    assert capped.expires_at == int(NOW + 30 * DAY)


# ---- ownership, listing, deleting ----------------------------------------------------------------


def test_another_keys_file_is_not_found_and_an_admin_sees_every_file(db: Database, tmp_path: Path) -> None:
    store = make_store(db, tmp_path / "files")
    mine = upload(store, ALICE, b"alice\n")
    theirs = upload(store, BOB, b"bob\n")
    for call in (store.get, store.delete):
        with pytest.raises(FileNotFound) as caught:
            call(mine.id, BOB)
        assert caught.value.message == f"No such File object: {mine.id}" and caught.value.param == "id"
    assert store.list(BOB) == ([theirs], False)
    assert store.list(ADMIN) == ([theirs, mine], False)
    assert store.get(mine.id, ADMIN) == mine
    assert store.path(mine.id).exists()  # Bob's delete touched nothing


@pytest.mark.parametrize("file_id", ["file-nope", "", "../embedserve.db", "file-" + "0" * 32])
def test_an_unknown_or_malformed_id_is_not_found(db: Database, tmp_path: Path, file_id: str) -> None:
    store = make_store(db, tmp_path / "files")
    with pytest.raises(FileNotFound):
        store.get(file_id, ADMIN)
    with pytest.raises(FileNotFound):
        store.delete(file_id, ADMIN)


def test_a_path_is_only_ever_made_of_a_file_id(sqlite: Database, tmp_path: Path) -> None:
    store = make_store(sqlite, tmp_path / "files")
    assert store.path(new_file_id()).parent == store.root
    for bad in ("../x", "file-1/../../x", "file-ABC", ""):
        with pytest.raises(ValueError, match="not a file id"):
            store.path(bad)


def test_pages_come_newest_first_by_id_with_after_limit_order_and_purpose(
    db: Database, tmp_path: Path
) -> None:
    store = make_store(db, tmp_path / "files")
    made = [upload(store, ALICE, b"%d\n" % i) for i in range(5)]
    output = store.new_record(new_file_id(), ALICE.key_id, "out.jsonl", "batch_output", 3)
    store.path(output.id).write_bytes(b"out")
    store.register(output)
    newest = [output, *reversed(made)]
    assert [r.id for r in newest] == sorted((r.id for r in newest), reverse=True)
    assert store.list(ALICE) == (newest, False)
    assert store.list(ALICE, limit=2) == (newest[:2], True)
    assert store.list(ALICE, limit=2, after=newest[1].id) == (newest[2:4], True)
    assert store.list(ALICE, limit=2, after=newest[3].id) == (newest[4:], False)
    assert store.list(ALICE, order="asc", limit=3) == (made[:3], True)
    assert store.list(ALICE, order="asc", after=made[2].id) == ([*made[3:], output], False)
    assert store.list(ALICE, purpose="batch_output") == ([output], False)
    assert store.list(ALICE, purpose="batch", limit=5) == (list(reversed(made)), False)
    assert store.list(BOB) == ([], False)


def test_register_is_idempotent(db: Database, tmp_path: Path) -> None:
    store = make_store(db, tmp_path / "files")
    record = store.new_record(new_file_id(), ALICE.key_id, "out.jsonl", "batch_output", 2)
    store.path(record.id).write_bytes(b"ok")
    store.register(record)
    store.register(record)  # a worker that resumes after a crash registers again
    assert store.list(ALICE) == ([record], False)


def test_a_file_that_an_unfinished_batch_reads_cannot_be_deleted(db: Database, tmp_path: Path) -> None:
    store = make_store(db, tmp_path / "files")
    record = upload(store, ALICE, b'{"custom_id": "1"}\n')
    add_batch(db, "batch_1", record.id, "completed")
    add_batch(db, "batch_2", record.id, "in_progress")
    with pytest.raises(Conflict) as caught:
        store.delete(record.id, ALICE)
    assert "batch_2" in caught.value.message
    assert store.path(record.id).exists() and store.get(record.id, ALICE) == record
    with db.transaction() as tx:
        tx.execute("UPDATE batches SET status = 'cancelled' WHERE id = 'batch_2'")
    assert store.delete(record.id, ALICE) == record
    assert not store.path(record.id).exists()
    with pytest.raises(FileNotFound):
        store.get(record.id, ALICE)


def test_parse_list_query_takes_openais_parameters_and_refuses_bad_ones() -> None:
    assert parse_list_query({}) == parse_list_query({"order": "desc", "limit": "10000"})
    query = parse_list_query(
        {"after": "file-x", "limit": "3", "order": "asc", "purpose": "batch", "other": "1"}
    )
    assert (query.after, query.limit, query.order, query.purpose) == ("file-x", 3, "asc", "batch")
    for bad in ({"limit": "0"}, {"limit": "10001"}, {"limit": "-1"}, {"limit": "²"}, {"limit": "x"}):
        with pytest.raises(InvalidRequest) as caught:
            parse_list_query(bad)
        assert caught.value.param == "limit"
    with pytest.raises(InvalidRequest) as order:
        parse_list_query({"order": "newest"})
    assert order.value.param == "order"


# ---- the sweep -----------------------------------------------------------------------------------


def test_the_sweep_removes_expired_files_but_not_one_an_unfinished_batch_reads(
    db: Database, tmp_path: Path
) -> None:
    clock = Clock()
    store = make_store(db, tmp_path / "files", clock)
    old = upload(store, ALICE, b"old\n")
    in_use = upload(store, ALICE, b"in use\n")
    add_batch(db, "batch_1", in_use.id, "validating")
    clock.now = NOW + 10 * DAY
    fresh = upload(store, ALICE, b"fresh\n")
    assert store.sweep(NOW + 30 * DAY - 1) == 0
    assert store.sweep(NOW + 30 * DAY) == 1
    assert store.list(ADMIN) == ([fresh, in_use], False)
    assert leftovers(store.root) == sorted([fresh.id, in_use.id])
    with pytest.raises(FileNotFound):
        store.get(old.id, ALICE)


def test_the_sweep_removes_what_a_crash_left_once_it_is_an_hour_old(db: Database, tmp_path: Path) -> None:
    store = make_store(db, tmp_path / "files")
    kept = upload(store, ALICE, b"kept\n")
    now = time.time()
    names = {
        "old_part": f"{new_file_id()}.part",  # an upload that a crash cut
        "new_part": f"{new_file_id()}.part",  # an upload under way
        "orphan": new_file_id(),  # renamed, but the crash came before its row
        "output": new_file_id(),  # a batch's output, being written
        "new_orphan": new_file_id(),
        "other": "notes.txt",  # not the store's
    }
    for name in names.values():
        (store.root / name).write_bytes(b"x")
    for key in ("old_part", "orphan", "output", "other"):
        os.utime(store.root / names[key], (now - STRAY_AGE_S - 60,) * 2)
    os.utime(store.path(kept.id), (now - STRAY_AGE_S - 60,) * 2)
    add_batch(db, "batch_1", kept.id, "in_progress", output=names["output"])
    assert store.sweep(now) == 2
    assert leftovers(store.root) == sorted(
        [kept.id, names["new_part"], names["output"], names["new_orphan"], names["other"]]
    )


def test_the_store_refuses_a_files_dir_it_cannot_create(sqlite: Database, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="files directory"):
        make_store(sqlite, blocker / "files")
