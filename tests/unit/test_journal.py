"""The usage journal's file format and file handling: a record round-trips through its line exactly,
anything else is refused, a torn line never costs the records around it, a replay hands every record once
and removes the file only after the last chunk, and the flock keeps an append and a replay apart."""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pytest

from embedserve.errors import ConfigError
from embedserve.journal import UsageJournal, decode_record, encode_record
from embedserve.types import UsageRecord


def rec(tokens: int, **fields: object) -> UsageRecord:
    values: dict[str, object] = {
        "key_id": "key_a",
        "model": "all-MiniLM-L6-v2",
        "prompt_tokens": tokens,
        "inputs": 2,
        "request_id": "req-1",
        "created_at": 1736000000.123456,
        "latency_ms": 12.75,
        "price_per_million": 0.02,
        **fields,
    }
    return UsageRecord(**values)  # type: ignore[arg-type]


class Sink:
    """What the ledger's write does, in memory: commits a chunk, skips ids it has. -> how many new."""

    def __init__(self) -> None:
        self.ids: dict[str, UsageRecord] = {}
        self.chunks: list[int] = []

    def __call__(self, records: Sequence[UsageRecord]) -> int:
        self.chunks.append(len(records))
        new = [r for r in records if r.record_id not in self.ids]
        self.ids.update((r.record_id, r) for r in new)
        return len(new)


def test_every_record_gets_its_own_id() -> None:
    ids = {rec(1).record_id for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_a_record_round_trips_through_its_line_exactly() -> None:
    record = rec(7, model="modèle 🚀", request_id='quote " and \\ backslash', created_at=0.1 + 0.2)
    line = encode_record(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_record(line) == record


def _line(**changes: object) -> bytes:
    doc = {**asdict(rec(1)), **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(encode_record(rec(1))[:40], id="torn"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe{}", id="not utf-8"),
        pytest.param(b"[1, 2]", id="not an object"),
        pytest.param(_line(record_id=...), id="missing field"),
        pytest.param(_line(extra=1), id="unknown field"),
        pytest.param(_line(record_id=""), id="empty record id"),
        pytest.param(_line(key_id=5), id="key id not a string"),
        pytest.param(_line(prompt_tokens=True), id="bool as a count"),
        pytest.param(_line(prompt_tokens=1.5), id="fractional count"),
        pytest.param(_line(inputs=-1), id="negative count"),
        pytest.param(_line(latency_ms="1"), id="number as a string"),
        pytest.param(_line(created_at=float("nan")), id="NaN"),
        pytest.param(_line(created_at=1e400), id="infinite"),
    ],
)
def test_a_line_that_is_not_a_whole_record_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the reason
        decode_record(line)


def test_whole_number_floats_come_back_as_floats() -> None:
    record = decode_record(_line(created_at=1736000000, latency_ms=0, price_per_million=0))
    assert (record.created_at, record.latency_ms, record.price_per_million) == (1736000000.0, 0.0, 0.0)
    assert all(isinstance(v, float) for v in (record.created_at, record.latency_ms, record.price_per_million))


def test_appends_accumulate_and_a_replay_hands_each_record_once_then_removes_the_journal(
    tmp_path: Path,
) -> None:
    journal = UsageJournal(tmp_path / "state" / "usage-journal.jsonl")  # the folder is created
    first, second = [rec(1), rec(2)], [rec(3)]
    journal.append(first)
    journal.append([])
    journal.append(second)
    assert journal.path.stat().st_mode & 0o777 == 0o600
    sink = Sink()
    replayed = journal.replay(sink)
    assert (replayed.records, replayed.new, replayed.rejected) == (3, 3, 0)
    assert list(sink.ids.values()) == first + second
    assert not journal.path.exists()
    assert journal.replay(sink) == type(replayed)(0, 0, 0)  # no journal: nothing happens


def test_a_replay_commits_chunk_by_chunk(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path / "usage-journal.jsonl")
    journal.append([rec(i) for i in range(7)])
    sink = Sink()
    assert journal.replay(sink, chunk=3).records == 7
    assert sink.chunks == [3, 3, 1]


def test_a_replay_that_fails_midway_keeps_the_whole_journal_and_the_next_one_counts_each_once(
    tmp_path: Path,
) -> None:
    journal = UsageJournal(tmp_path / "usage-journal.jsonl")
    records = [rec(i) for i in range(7)]
    journal.append(records)
    before = journal.path.read_bytes()
    sink = Sink()

    def failing_second_chunk(batch: Sequence[UsageRecord]) -> int:
        if sink.chunks:
            raise OSError("database gone")
        return sink(batch)

    with pytest.raises(OSError, match="database gone"):
        journal.replay(failing_second_chunk, chunk=3)
    assert journal.path.read_bytes() == before
    replayed = journal.replay(sink, chunk=3)
    assert (replayed.records, replayed.new) == (7, 4)
    assert sorted(r.prompt_tokens for r in sink.ids.values()) == list(range(7))


def test_a_torn_last_line_costs_no_later_record_and_is_kept_aside(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path / "usage-journal.jsonl")
    journal.append([rec(1)])
    torn = encode_record(rec(2))[:30]
    with journal.path.open("ab") as fh:  # a crash in the middle of an append
        fh.write(torn)
    journal.append([rec(3)])
    assert journal.path.read_bytes().count(b"\n") == 3  # the torn line was ended first
    sink = Sink()
    replayed = journal.replay(sink)
    assert (replayed.records, replayed.rejected) == (2, 1)
    assert [r.prompt_tokens for r in sink.ids.values()] == [1, 3]
    assert journal.rejected_path.read_bytes() == torn + b"\n"


def test_check_accepts_a_writable_journal_without_leaving_a_file_and_keeps_an_existing_one(
    tmp_path: Path,
) -> None:
    journal = UsageJournal(tmp_path / "new" / "usage-journal.jsonl")
    journal.check()
    assert not journal.path.exists()
    journal.append([rec(1)])
    content = journal.path.read_bytes()
    journal.check()
    assert journal.path.read_bytes() == content


@pytest.mark.parametrize("where", ["under a file", "a directory"])
def test_a_journal_that_cannot_be_written_fails_check_and_append(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    path = tmp_path / "file" / "journal.jsonl" if where == "under a file" else tmp_path / "dir"
    journal = UsageJournal(path)
    with pytest.raises(ConfigError, match=f"cannot write the usage journal {path}"):
        journal.check()
    with pytest.raises(OSError):  # noqa: PT011 - ENOTDIR or EISDIR
        journal.append([rec(1)])


def test_a_replay_waits_for_an_append_under_way_elsewhere_and_includes_it(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path / "usage-journal.jsonl")
    journal.append([rec(1)])
    other = os.open(journal.path, os.O_WRONLY | os.O_APPEND)  # another process's descriptor
    fcntl.flock(other, fcntl.LOCK_EX)
    sink = Sink()
    replay = threading.Thread(target=journal.replay, args=(sink,))
    replay.start()
    replay.join(0.3)
    assert replay.is_alive()  # held off by the lock
    os.write(other, encode_record(rec(2)))
    os.close(other)  # releases the lock
    replay.join(10)
    assert [r.prompt_tokens for r in sink.ids.values()] == [1, 2]
    assert not journal.path.exists()


def test_an_append_that_waited_while_a_replay_removed_the_journal_writes_a_new_one(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path / "usage-journal.jsonl")
    journal.append([rec(1)])
    replaying = os.open(journal.path, os.O_RDWR)
    fcntl.flock(replaying, fcntl.LOCK_EX)
    append = threading.Thread(target=journal.append, args=([rec(2)],))
    append.start()
    append.join(0.3)
    assert append.is_alive()
    os.unlink(journal.path)  # the replay is done with the old file
    os.close(replaying)
    append.join(10)
    assert [decode_record(line).prompt_tokens for line in journal.path.read_bytes().splitlines()] == [2]
