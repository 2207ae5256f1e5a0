"""The corpus command's parts below the engine: formats by extension, the four readers (streamed, bad
records named by line), chunking, engine errors named by record, progress lines, and the three outputs:
written, read back, cut short as a kill leaves them, and resumed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedserve.corpus.chunks import Chunk, chunked, estimate_tokens, locate
from embedserve.corpus.formats import input_format, output_format
from embedserve.corpus.jsonl_output import JsonlOutput
from embedserve.corpus.npy_output import HEADER_BYTES, npy_header, read_npy_header, sidecar
from embedserve.corpus.output import Output, RunInfo, open_output, skip_done
from embedserve.corpus.parquet_output import parts_dir
from embedserve.corpus.progress import LineProgress, duration, progress_line
from embedserve.corpus.readers import count_records, open_rows
from embedserve.corpus.rows import Fields, Row, Source
from embedserve.errors import ConfigError, ContextLengthExceeded, EmptyInput, InvalidRequest

# ---- formats --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("a.jsonl", "jsonl"), ("a.NDJSON", "jsonl"), ("a.csv", "csv"), ("a.parquet", "parquet"),
     ("a.pq", "parquet"), ("a.txt", "text"), ("corpus", "text"), ("a.tsv", "text")],
)  # fmt: skip
def test_the_input_format_follows_the_extension_and_anything_else_is_text(name: str, fmt: str) -> None:
    assert input_format(Path(name)) == fmt


def test_an_input_format_given_wins_over_the_extension() -> None:
    assert input_format(Path("a.txt"), "jsonl") == "jsonl"
    assert output_format(Path("vectors.bin"), "npy") == "npy"


@pytest.mark.parametrize(("name", "fmt"), [("o.parquet", "parquet"), ("o.jsonl", "jsonl"), ("o.npy", "npy")])
def test_the_output_format_follows_the_extension(name: str, fmt: str) -> None:
    assert output_format(Path(name)) == fmt


def test_an_output_of_unknown_extension_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"'out.bin'.*\.parquet, \.jsonl or \.npy, or pass --output-format"):
        output_format(Path("out.bin"))


# ---- readers --------------------------------------------------------------------------------------------


def rows_of(path: Path, fmt: str, fields: Fields | None = None) -> list[Row]:
    return list(open_rows(path, fmt, fields or Fields())[1])  # type: ignore[arg-type]


def test_jsonl_rows_carry_their_ids_as_strings_and_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "first"}\n\n{"id": 7, "text": "second", "x": 1}\n')
    assert rows_of(path, "jsonl") == [Row("a", "first", 1), Row("7", "second", 3)]


def test_jsonl_without_an_id_field_numbers_its_rows_by_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "one"}\n{"body": "two"}')  # (no line break at the end)
    assert rows_of(path, "jsonl", Fields(text="body")) == [Row("1", "one", 1), Row("2", "two", 2)]


def test_jsonl_takes_the_fields_named(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"key": "k1", "id": "ignored", "body": "one"}\n')
    assert rows_of(path, "jsonl", Fields(text="body", id="key")) == [Row("k1", "one", 1)]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"text": "ok"}\n{"text": "unterminated\n', r"docs\.jsonl line 2: not valid JSON \("),
        ('{"text": "ok"}\n[1, 2]\n', r"docs\.jsonl line 2: an array, not a JSON object"),
        ('{"text": "ok"}\n{"body": "x"}\n', r"docs\.jsonl line 2: no 'text' field \(--text-field names"),
        ('{"text": 3}\n', r"docs\.jsonl line 1: 'text' is a number, not a string"),
        ('{"id": "a", "text": "x"}\n{"text": "y"}\n', r"docs\.jsonl line 2: no 'id' field"),
        (
            '{"id": 1.5, "text": "x"}\n',
            r"docs\.jsonl line 1: 'id' is a number; an id is a string or an integer",
        ),
        ('{"id": "", "text": "x"}\n', r"docs\.jsonl line 1: 'id' is an empty string"),
    ],
)
def test_a_bad_jsonl_record_is_refused_naming_its_line(tmp_path: Path, lines: str, message: str) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(lines)
    with pytest.raises(InvalidRequest, match=message):
        rows_of(path, "jsonl")


def test_csv_records_are_named_by_the_line_they_start_on(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text('title,text\nA,"one line"\nB,"two\nlines"\n\nC,three\n', newline="")
    assert rows_of(path, "csv") == [Row("2", "one line", 2), Row("3", "two\nlines", 3), Row("6", "three", 6)]


def test_csv_takes_ids_from_an_id_column(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("id,text\nx1,hello\nx2,world\n")
    assert [(r.id, r.text) for r in rows_of(path, "csv")] == [("x1", "hello"), ("x2", "world")]


def test_a_csv_without_the_text_column_is_refused_before_any_record_listing_its_columns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("id,body\n1,x\n")
    with pytest.raises(ConfigError, match=r"docs\.csv has no column 'text' .*its columns: id, body"):
        open_rows(path, "csv", Fields())


def test_a_csv_record_short_of_the_text_is_refused_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("id,title,text\n1,a,b\n2,c\n")
    with pytest.raises(
        InvalidRequest, match=r"docs\.csv line 3: 2 fields, fewer than the header's: no 'text'"
    ):
        rows_of(path, "csv")


def test_parquet_rows_take_string_or_integer_ids_or_their_row_numbers(tmp_path: Path) -> None:
    strings, ints, bare = tmp_path / "s.parquet", tmp_path / "i.parquet", tmp_path / "n.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), strings)
    pq.write_table(pa.table({"id": pa.array([10, 11], pa.int64()), "text": ["x", "y"]}), ints)
    pq.write_table(pa.table({"text": pa.array(["x", "y"], pa.large_string())}), bare)
    assert rows_of(strings, "parquet") == [Row("a", "x", 1), Row("b", "y", 2)]
    assert [r.id for r in rows_of(ints, "parquet")] == ["10", "11"]
    assert rows_of(bare, "parquet") == [Row("1", "x", 1), Row("2", "y", 2)]


def test_a_parquet_text_column_of_another_type_or_a_null_text_is_refused(tmp_path: Path) -> None:
    numbers, nulls = tmp_path / "n.parquet", tmp_path / "z.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    pq.write_table(pa.table({"text": ["x", None]}), nulls)
    with pytest.raises(ConfigError, match=r"n\.parquet: column 'text' holds int64, not strings"):
        open_rows(numbers, "parquet", Fields())
    with pytest.raises(InvalidRequest, match=r"z\.parquet row 2: 'text' is null"):
        rows_of(nulls, "parquet")


def test_a_file_that_is_not_parquet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet")
    with pytest.raises(ConfigError, match=r"fake\.parquet is not a Parquet file"):
        open_rows(path, "parquet", Fields())


def test_plain_text_is_a_line_each_numbered_from_one_line_breaks_left_out(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_bytes(b"first\r\nsecond\n\nlast")
    assert rows_of(path, "text") == [
        Row("1", "first", 1),
        Row("2", "second", 2),
        Row("3", "", 3),
        Row("4", "last", 4),
    ]


def test_plain_text_that_is_not_utf8_is_refused_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(InvalidRequest, match=r"docs\.txt line 2: not UTF-8"):
        rows_of(path, "text")


def test_plain_text_takes_no_fields(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("x\n")
    with pytest.raises(ConfigError, match="plain text input has no fields"):
        open_rows(path, "text", Fields(text="body"))


def test_a_missing_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no input '.*nothing\.jsonl'"):
        open_rows(tmp_path / "nothing.jsonl", "jsonl", Fields())


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "text"])
def test_line_readers_yield_records_before_the_input_ends(tmp_path: Path, fmt: str) -> None:
    """Read from a pipe whose writer has not finished: a reader that read the whole input first would
    wait for its end, which never comes before the rows are taken."""
    fifo = tmp_path / f"corpus.{fmt}"
    os.mkfifo(fifo)
    head = {"jsonl": b'{"text": "one"}\n', "csv": b"text\none\n", "text": b"one\n"}[fmt]
    more = {"jsonl": b'{"text": "two"}\n', "csv": b"two\n", "text": b"two\n"}[fmt]
    release = threading.Event()

    def write() -> None:
        with fifo.open("wb") as fh:
            fh.write(head)
            fh.flush()
            release.wait(30)
            fh.write(more)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        rows = open_rows(fifo, fmt, Fields())[1]  # type: ignore[arg-type]
        assert next(rows).text == "one"  # while the writer still holds the rest back
        release.set()
        assert [r.text for r in rows] == ["two"]
    finally:
        release.set()
        writer.join(30)


def test_the_parquet_reader_holds_one_record_batch_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.parquet"
    text = "a fairly long passage of text " * 20
    table = pa.table({"id": [str(i) for i in range(40_000)], "text": [text] * 40_000})
    pq.write_table(table, path, row_group_size=2000)
    whole = table.nbytes
    del table
    base, peak = pa.total_allocated_bytes(), 0
    count = 0
    for _ in open_rows(path, "parquet", Fields())[1]:
        count += 1
        if count % 500 == 0:
            peak = max(peak, pa.total_allocated_bytes() - base)
    assert count == 40_000
    assert peak < whole / 8, (peak, whole)  # (a row group is a twentieth)


def test_records_are_counted_for_the_progress_bar(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1\n2\n3")
    (tmp_path / "b.csv").write_text("text\nx\ny\n")
    pq.write_table(pa.table({"text": ["x"] * 5}), tmp_path / "c.parquet")
    assert count_records(tmp_path / "a.txt", "text") == 3
    assert count_records(tmp_path / "b.csv", "csv") == 2
    assert count_records(tmp_path / "c.parquet", "parquet") == 5


# ---- chunks ---------------------------------------------------------------------------------------------


def test_chunks_close_at_about_the_token_budget_or_the_item_limit_in_order() -> None:
    rows = [Row(str(i), "x" * 38, i) for i in range(1, 11)]  # 38 // 4 + 2 = 11 tokens each
    assert estimate_tokens("x" * 38) == 11
    by_tokens = list(chunked(rows, batch_tokens=30, max_items=100))
    assert [len(c.rows) for c in by_tokens] == [3, 3, 3, 1]
    by_items = list(chunked(rows, batch_tokens=10_000, max_items=4))
    assert [len(c.rows) for c in by_items] == [4, 4, 2]
    assert [r for c in by_items for r in c.rows] == rows


def test_an_engine_refusal_of_one_input_names_the_record_it_is_about() -> None:
    chunk = Chunk((Row("a", "ok", 4), Row("b", "", 5)))
    where = Source(Path("docs.jsonl"), "line").where
    empty = locate(
        EmptyInput("input[1] is an empty string; every input must be non-empty.", param="input"), chunk, where
    )
    assert isinstance(empty, EmptyInput)
    assert (
        empty.message
        == "docs.jsonl line 5 (id 'b'): the text is an empty string; every input must be non-empty."
    )
    long = locate(
        ContextLengthExceeded("input[0] is 300 tokens long. Shorten or split it.", param="input"),
        chunk,
        where,
    )
    assert long.message.startswith("docs.jsonl line 4 (id 'a'): the text is 300 tokens long.")
    assert "--truncate" in long.message
    other = InvalidRequest("The model does not support the 'dimensions' parameter", param="dimensions")
    assert locate(other, chunk, where) is other


# ---- progress -------------------------------------------------------------------------------------------


def test_progress_lines_give_the_share_the_rates_and_the_eta() -> None:
    assert duration(42) == "42s" and duration(185) == "3m05s" and duration(7380) == "2h03m"
    assert progress_line(12_000, 50_000, 120_000, 30.0) == (
        "12,000/50,000 rows (24%), 400 rows/s, 4,000 tokens/s, ETA 1m35s"
    )
    assert progress_line(500, None, 5000, 10.0) == "500 rows, 50 rows/s, 500 tokens/s"


def test_progress_lines_come_at_most_every_interval() -> None:
    now = [0.0]
    lines: list[str] = []
    progress = LineProgress(lines.append, every_s=5.0, total=100, clock=lambda: now[0])
    for second in range(1, 13):
        now[0] = float(second)
        progress.update(5, 50)
    assert len(lines) == 2  # at 5 s and 10 s
    assert lines[0].startswith("25/100 rows (25%), 5 rows/s")


# ---- outputs --------------------------------------------------------------------------------------------

DIMS = 8
INFO = RunInfo(model="m", dimensions=DIMS)


def vectors(start: int, count: int) -> np.ndarray:
    """Rows whose values say which row they are: row i is i + [0, 0.125, ...]."""
    return (np.arange(start, start + count, dtype=np.float32)[:, None] + np.arange(DIMS) / DIMS).astype(
        np.float32
    )


def ids(start: int, count: int) -> list[str]:
    return [f"id-{i}" for i in range(start, start + count)]


def write_rows(output: Output, start: int, stop: int, step: int = 10) -> None:
    for at in range(start, stop, step):
        count = min(step, stop - at)
        output.write(ids(at, count), vectors(at, count), [at % 50 + 1] * count)


def read_back(path: Path, fmt: str) -> tuple[list[str], np.ndarray, list[int]]:
    if fmt == "parquet":
        table = pq.read_table(path)
        flat = table.column("embedding").combine_chunks().values.to_numpy()
        return (
            table.column("id").to_pylist(),
            flat.reshape(len(table), DIMS),
            table.column("tokens").to_pylist(),
        )
    if fmt == "jsonl":
        rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        return (
            [r["id"] for r in rows],
            np.asarray([r["embedding"] for r in rows], np.float32),
            [r["tokens"] for r in rows],
        )
    lines = [orjson.loads(line) for line in sidecar(path).read_bytes().splitlines()]
    return [r["id"] for r in lines], np.load(path), [r["tokens"] for r in lines]


FORMATS = ["parquet", "jsonl", "npy"]


def out_path(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / f"vectors.{fmt}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_output_holds_every_row_in_order_exactly(tmp_path: Path, fmt: str) -> None:
    path = out_path(tmp_path, fmt)
    output = open_output(path, fmt, INFO, resume=False, overwrite=False, checkpoint_rows=25)  # type: ignore[arg-type]
    write_rows(output, 0, 103)
    output.finish()
    got_ids, got, tokens = read_back(path, fmt)
    assert got_ids == ids(0, 103)
    np.testing.assert_array_equal(got, vectors(0, 103))
    assert tokens == [i % 50 + 1 for i in range(0, 103, 10) for _ in range(min(10, 103 - i))]
    if fmt == "parquet":
        assert not parts_dir(path).exists()
        schema = pq.read_schema(path)
        assert schema.field("embedding").type == pa.list_(pa.float32(), DIMS)
        assert schema.field("tokens").type == pa.int32() and schema.field("id").type == pa.string()


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_reach_the_disk_a_checkpoint_at_a_time_not_at_the_end(tmp_path: Path, fmt: str) -> None:
    """The buffer is bounded: with checkpoints of 25 rows, after 100 rows written at least 75 are on
    disk, and a resume of what is there (nothing finished) finds them."""
    path = out_path(tmp_path, fmt)
    output = open_output(path, fmt, INFO, resume=False, overwrite=False, checkpoint_rows=25)  # type: ignore[arg-type]
    write_rows(output, 0, 100)
    resumed = open_output(path, fmt, INFO, resume=True, overwrite=False)  # type: ignore[arg-type]
    assert resumed.rows >= 75
    assert list(resumed.done_ids()) == ids(0, resumed.rows)


def _kill_leftovers(path: Path, fmt: str) -> None:
    """What a kill in the middle of a checkpoint (or of the final merge) leaves beside the whole rows."""
    if fmt == "parquet":
        (parts_dir(path) / "part-00000099.parquet.tmp").write_bytes(b"PAR1 half a part")
        path.with_name(path.name + ".merging").write_bytes(b"PAR1 half a merge")
    elif fmt == "jsonl":
        with path.open("ab") as fh:
            fh.write(b'{"id": "id-torn", "embedding": [0.1, 0.')
    else:
        with path.open("ab") as fh:
            fh.write(vectors(0, 1).tobytes() + b"\x00\x01")  # a row and a half past the ids
        with sidecar(path).open("ab") as fh:
            fh.write(b'{"id": "id-to')


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_resume_after_a_kill_keeps_every_whole_row_and_finishes_exactly(tmp_path: Path, fmt: str) -> None:
    path = out_path(tmp_path, fmt)
    first = open_output(path, fmt, INFO, resume=False, overwrite=False, checkpoint_rows=20)  # type: ignore[arg-type]
    write_rows(first, 0, 70)  # 60 checkpointed, 10 only buffered when the process dies
    _kill_leftovers(path, fmt)
    with pytest.raises(ConfigError, match="exists: --resume continues it, --overwrite replaces it"):
        open_output(path, fmt, INFO, resume=False, overwrite=False)  # type: ignore[arg-type]
    resumed = open_output(path, fmt, INFO, resume=True, overwrite=False, checkpoint_rows=20)  # type: ignore[arg-type]
    assert resumed.rows == 60
    assert list(resumed.done_ids()) == ids(0, 60)
    write_rows(resumed, 60, 130)
    resumed.finish()
    got_ids, got, _ = read_back(path, fmt)
    assert got_ids == ids(0, 130)
    np.testing.assert_array_equal(got, vectors(0, 130))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {
            "parquet": ["vectors.parquet"],
            "jsonl": ["vectors.jsonl"],
            "npy": ["vectors.npy", "vectors.ids.jsonl"],
        }[fmt]
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_output(tmp_path: Path, fmt: str) -> None:
    path = out_path(tmp_path, fmt)
    output = open_output(path, fmt, INFO, resume=False, overwrite=False, checkpoint_rows=100)  # type: ignore[arg-type]
    write_rows(output, 0, 50)
    assert list(tmp_path.iterdir()) == []
    open_output(path, fmt, INFO, resume=False, overwrite=False).finish()  # type: ignore[arg-type]
    assert read_back(path, fmt)[0] == []  # no rows at all: an empty output


def test_a_killed_npy_output_still_loads_with_the_rows_of_its_last_checkpoint(tmp_path: Path) -> None:
    path = out_path(tmp_path, "npy")
    output = open_output(path, "npy", INFO, resume=False, overwrite=False, checkpoint_rows=20)
    write_rows(output, 0, 50)
    np.testing.assert_array_equal(np.load(path), vectors(0, 40))


def test_a_finished_parquet_output_resumed_takes_more_rows_after_its_own(tmp_path: Path) -> None:
    path = out_path(tmp_path, "parquet")
    output = open_output(path, "parquet", INFO, resume=False, overwrite=False)
    write_rows(output, 0, 30)
    output.finish()
    unchanged = open_output(path, "parquet", INFO, resume=True, overwrite=False)
    assert unchanged.rows == 30 and list(unchanged.done_ids()) == ids(0, 30)
    unchanged.finish()  # nothing to add: the file stays as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.parquet"]
    resumed = open_output(path, "parquet", INFO, resume=True, overwrite=False)
    write_rows(resumed, 30, 45)
    resumed.finish()
    assert read_back(path, "parquet")[0] == ids(0, 45)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.parquet"]


def test_a_parquet_merge_renamed_in_wins_over_the_parts_left_behind(tmp_path: Path) -> None:
    """A kill between the merge's rename and the removal of the parts: the merged file is whole."""
    path = out_path(tmp_path, "parquet")
    output = open_output(path, "parquet", INFO, resume=False, overwrite=False, checkpoint_rows=10)
    write_rows(output, 0, 30)
    output.finish()
    stale = tmp_path / "stale.parquet"
    write_rows(
        open_output(stale, "parquet", INFO, resume=False, overwrite=False, checkpoint_rows=5), 100, 105
    )
    os.rename(parts_dir(stale), parts_dir(path))
    resumed = open_output(path, "parquet", INFO, resume=True, overwrite=False)
    assert resumed.rows == 30 and list(resumed.done_ids()) == ids(0, 30)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_resume_that_would_make_vectors_of_another_width_is_refused(tmp_path: Path, fmt: str) -> None:
    path = out_path(tmp_path, fmt)
    output = open_output(path, fmt, INFO, resume=False, overwrite=False)  # type: ignore[arg-type]
    write_rows(output, 0, 5)
    output.finish()
    with pytest.raises(ConfigError, match=r"holds 8-dimensional vectors, this run makes 4"):
        open_output(path, fmt, RunInfo("m", 4), resume=True, overwrite=False)  # type: ignore[arg-type]


def test_a_parquet_resume_with_another_model_or_input_type_is_refused(tmp_path: Path) -> None:
    path = out_path(tmp_path, "parquet")
    output = open_output(path, "parquet", INFO, resume=False, overwrite=False)
    write_rows(output, 0, 5)
    output.finish()
    with pytest.raises(
        ConfigError, match=r"made with model 'm' \(now 'other'\), input_type None \(now 'query'\)"
    ):
        open_output(path, "parquet", RunInfo("other", DIMS, "query"), resume=True, overwrite=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_overwrite_replaces_an_output_and_its_leftovers(tmp_path: Path, fmt: str) -> None:
    path = out_path(tmp_path, fmt)
    output = open_output(path, fmt, INFO, resume=False, overwrite=False, checkpoint_rows=5)  # type: ignore[arg-type]
    write_rows(output, 0, 20)
    again = open_output(path, fmt, INFO, resume=False, overwrite=True)  # type: ignore[arg-type]
    assert again.rows == 0
    write_rows(again, 100, 103)
    again.finish()
    assert read_back(path, fmt)[0] == ids(100, 3)


@pytest.mark.parametrize(
    ("fmt", "content", "message"),
    [
        ("parquet", b"not parquet", r"vectors\.parquet is not a Parquet file"),
        ("jsonl", b'{"a": 1}\n', r"vectors\.jsonl line 1 is not a row of an `embedserve embed` output"),
    ],
)
def test_a_resume_onto_a_file_this_command_did_not_write_is_refused(
    tmp_path: Path, fmt: str, content: bytes, message: str
) -> None:
    path = out_path(tmp_path, fmt)
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        open_output(path, fmt, INFO, resume=True, overwrite=False)  # type: ignore[arg-type]


def test_an_npy_header_is_fixed_size_and_numpy_reads_it(tmp_path: Path) -> None:
    for rows in (0, 7, 10**15):
        assert len(npy_header(rows, 1024)) == HEADER_BYTES
        assert read_npy_header(npy_header(rows, 1024), Path("v.npy")) == (rows, 1024)
    path = tmp_path / "v.npy"
    path.write_bytes(npy_header(2, DIMS) + vectors(0, 2).tobytes())
    np.testing.assert_array_equal(np.load(path), vectors(0, 2))
    np.save(tmp_path / "theirs.npy", np.zeros((2, DIMS), np.float64))
    with pytest.raises(ConfigError, match=r"theirs\.npy is not an output of `embedserve embed`"):
        read_npy_header((tmp_path / "theirs.npy").read_bytes()[:HEADER_BYTES], tmp_path / "theirs.npy")


def test_resume_skips_the_rows_already_written_and_refuses_another_input(tmp_path: Path) -> None:
    path = out_path(tmp_path, "jsonl")
    output = open_output(path, "jsonl", INFO, resume=False, overwrite=False)
    write_rows(output, 0, 3)
    output.finish()
    resumed = open_output(path, "jsonl", INFO, resume=True, overwrite=False)
    source = Source(Path("docs.jsonl"), "line")
    same = iter([Row(i, "t", n) for n, i in enumerate([*ids(0, 3), "next"], 1)])
    assert [r.id for r in skip_done(same, resumed, source)] == ["next"]
    other = iter([Row(i, "t", n) for n, i in enumerate(["id-0", "zzz", "id-2"], 1)])
    with pytest.raises(
        ConfigError, match=r"row 2 of vectors\.jsonl has id 'id-1', but docs\.jsonl line 2 has id 'zzz'"
    ):
        skip_done(other, resumed, source)
    short = iter([Row("id-0", "t", 1)])
    with pytest.raises(ConfigError, match=r"vectors\.jsonl holds 3 rows, the input only 1"):
        skip_done(short, resumed, source)


def test_an_output_in_a_folder_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no folder"):
        open_output(tmp_path / "nope" / "v.jsonl", "jsonl", INFO, resume=False, overwrite=False)


def test_jsonl_output_lines_are_the_documented_shape(tmp_path: Path) -> None:
    path = out_path(tmp_path, "jsonl")
    output = JsonlOutput.open(path, INFO, 10, resume=False)
    output.write(["a"], vectors(0, 1), [3])
    output.finish()
    assert list(orjson.loads(path.read_bytes())) == ["id", "embedding", "tokens"]
