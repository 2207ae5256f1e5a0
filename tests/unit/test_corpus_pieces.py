"""The split of a corpus job's input into pieces (cluster/pieces.py), on local files: byte ranges that
cover a file once and start at line starts, numbered with the whole file's lines; a piece's rows are the
local reader's rows; folders and globs; the inputs refused before Ray starts."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedserve.cluster.pieces import (
    Piece,
    count_lines,
    cut_points,
    find_inputs,
    numbered,
    plan_pieces,
    rows_of,
)
from embedserve.corpus.readers import open_rows
from embedserve.corpus.rows import Fields
from embedserve.errors import ConfigError, InvalidRequest


def jsonl(path: Path, count: int, *, ids: bool = True) -> Path:
    records = (
        {"id": f"d{i}", "text": "word " * (i % 17 + 1)} if ids else {"text": f"t{i}"} for i in range(count)
    )
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def pieces_of(path: str | Path, piece_bytes: int) -> list[Piece]:
    filesystem, files = find_inputs(str(path), None)
    pieces = plan_pieces(filesystem, files, Fields(), piece_bytes)
    return numbered(pieces, [count_lines(filesystem, p) for p in pieces])


@pytest.mark.parametrize("piece_bytes", [1, 50, 333, 10_000])
def test_byte_ranges_cover_the_file_once_and_start_at_a_line(tmp_path: Path, piece_bytes: int) -> None:
    path = jsonl(tmp_path / "docs.jsonl", 60)
    data = path.read_bytes()
    filesystem, files = find_inputs(str(path), None)
    cuts = cut_points(filesystem, files[0].path, len(data), piece_bytes)
    assert cuts[0] == 0 and cuts[-1] == len(data) and cuts == sorted(set(cuts))
    assert all(data[cut - 1 : cut] == b"\n" for cut in cuts[1:-1])


@pytest.mark.parametrize(("name", "ids"), [("docs.jsonl", True), ("docs.jsonl", False), ("docs.txt", False)])
def test_the_pieces_rows_are_the_local_readers_rows(tmp_path: Path, name: str, ids: bool) -> None:
    path = jsonl(tmp_path / name, 45, ids=ids)
    pieces = pieces_of(path, 120)
    assert len(pieces) > 5
    filesystem, _ = find_inputs(str(path), None)
    got = [row for piece in pieces for row in rows_of(filesystem, piece, Fields())]
    fmt = "jsonl" if name.endswith(".jsonl") else "text"
    assert got == list(open_rows(path, fmt, Fields())[1])


def test_parquet_is_a_piece_a_row_group_numbered_from_the_footer(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(23)]}), path, row_group_size=5)
    pieces = pieces_of(path, 1)
    assert [(p.start, p.first) for p in pieces] == [(0, 1), (1, 6), (2, 11), (3, 16), (4, 21)]
    filesystem, _ = find_inputs(str(path), None)
    got = [row for piece in pieces for row in rows_of(filesystem, piece, Fields())]
    assert got == list(open_rows(path, "parquet", Fields())[1])


def test_several_files_prefix_numbered_ids_with_the_files_name(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    jsonl(tmp_path / "in" / "a.jsonl", 3)
    (tmp_path / "in" / "sub" / "b.txt").write_text("x\ny\n")
    filesystem, _ = find_inputs(str(tmp_path / "in"), None)
    rows = [
        row for piece in pieces_of(tmp_path / "in", 1 << 20) for row in rows_of(filesystem, piece, Fields())
    ]
    assert [r.id for r in rows] == ["d0", "d1", "d2", "sub/b.txt:1", "sub/b.txt:2"]


def test_a_glob_matches_within_one_segment_and_skips_hidden_and_marker_files(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl", ".c.jsonl", "_SUCCESS", "d.csv"):
        (tmp_path / name).write_text("")
    (tmp_path / "deeper").mkdir()
    (tmp_path / "deeper" / "e.jsonl").write_text("")
    _, files = find_inputs(f"{tmp_path}/*.jsonl", None)
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize(
    ("target", "message"),
    [("missing.jsonl", "no input "), ("*.parquet", "no file matches "), ("empty", "has no files")],
)
def test_inputs_that_name_nothing_are_refused(tmp_path: Path, target: str, message: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=message):
        find_inputs(f"{tmp_path}/{target}", None)


def test_a_bad_record_in_a_later_piece_is_named_by_its_line_in_the_file(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "docs.jsonl", 40)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[33] = b"[1, 2]\n"
    path.write_bytes(b"".join(lines))
    filesystem, _ = find_inputs(str(path), None)
    holding = [p for p in pieces_of(path, 100) if p.first <= 34][-1]
    assert holding.first > 1
    with pytest.raises(InvalidRequest, match=r"^docs.jsonl line 34: an array, not a JSON object$"):
        list(rows_of(filesystem, holding, Fields()))
