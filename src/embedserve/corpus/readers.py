"""The corpus readers: each a generator of Rows in file order that holds one record (a Parquet record
batch) at a time, whatever the file's size; a bad record fails with an error naming its line or row."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from embedserve.corpus.formats import InputFormat
from embedserve.corpus.rows import DEFAULT_ID_FIELD, Fields, Row, Source, id_of, json_type, text_of
from embedserve.errors import ConfigError, InvalidRequest

#: Rows per Parquet record batch read at a time (of the two columns read: text and id).
PARQUET_BATCH_ROWS = 1024
_BOM = b"\xef\xbb\xbf"
#: Bytes per read when counting lines (bounded, whatever the line lengths).
_COUNT_BLOCK = 1 << 20


def open_rows(path: Path, fmt: InputFormat, fields: Fields) -> tuple[Source, Iterator[Row]]:
    """The input's records. What can be checked before the first record is checked now (the file
    exists; a CSV header or Parquet schema has the fields): the rest as the records are read."""
    if not path.exists():
        raise ConfigError(f"no input {str(path)!r}")
    if path.is_dir():
        raise ConfigError(f"input {str(path)!r} is a folder, not a file")
    if fmt == "parquet":
        return Source(path, "row"), _parquet(path, fields)
    if fmt == "csv":
        return Source(path, "line"), _csv(path, fields)
    if fmt == "text" and fields != Fields():
        raise ConfigError(
            "plain text input has no fields: --text-field and --id-field are for JSONL, CSV, Parquet"
        )
    source = Source(path, "line")
    return source, (_jsonl(source, fields) if fmt == "jsonl" else _text(source))


def count_records(path: Path, fmt: InputFormat) -> int | None:
    """About how many records the input holds, for the progress bar's ETA, reading a block at a time:
    exact for Parquet (its footer) and plain text; JSONL counts blank lines too, CSV a quoted line break.
    None for a pipe, which can be read only once."""
    if not path.is_file():
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.read_metadata(path).num_rows)
    lines, last = 0, b"\n"
    with path.open("rb") as fh:
        while block := fh.read(_COUNT_BLOCK):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"  # a last line without its line break
    return max(0, lines - 1) if fmt == "csv" else lines


def _text(source: Source) -> Iterator[Row]:
    with source.path.open("rb") as fh:
        yield from text_rows(source, fh)


def text_rows(source: Source, lines: Iterable[bytes], first: int = 1) -> Iterator[Row]:
    """A line each, id = its line number (`first`: the number of the first of `lines`); the line break
    is not part of the text (an empty line is an empty text, which the engine refuses as the API does)."""
    for number, raw in enumerate(lines, first):
        line = raw.removeprefix(_BOM) if number == 1 else raw
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"{source.where(number)}: not UTF-8 ({exc.reason})") from None
        yield Row(str(number), text.removesuffix("\n").removesuffix("\r"), number)


def _jsonl(source: Source, fields: Fields) -> Iterator[Row]:
    with source.path.open("rb") as fh:
        yield from jsonl_rows(source, fh, fields)


def jsonl_rows(
    source: Source, lines: Iterable[bytes], fields: Fields, *, first: int = 1, decided: str | None = None
) -> Iterator[Row]:
    """A JSON object a line (blank lines skipped). Without --id-field the file's first record decides:
    an "id" field there is required on every line, else every id is its line number. `decided`: what
    the first record decided ("id" or ""), for lines that start further into the file."""
    id_field = fields.id if fields.id is not None else decided
    for number, raw in enumerate(lines, first):
        line = raw.removeprefix(_BOM) if number == 1 else raw
        if not line.strip():
            continue
        where = source.where(number)
        record = jsonl_record(line, where)
        if id_field is None:  # the first record decides
            id_field = DEFAULT_ID_FIELD if DEFAULT_ID_FIELD in record else ""
        row_id = _record_id(record, id_field, where, number, named=fields.id is not None)
        yield Row(row_id, _record_text(record, fields, where), number)


def jsonl_record(line: bytes, where: str) -> dict[str, Any]:
    """Pure: one JSONL line as its object, or the error naming the line."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise InvalidRequest(f"{where}: {json_type(record)}, not a JSON object")
    return record


def _record_text(record: dict[str, Any], fields: Fields, where: str) -> str:
    if fields.text not in record:
        raise InvalidRequest(
            f"{where}: no {fields.text!r} field (--text-field names the field that holds the text)",
            param=fields.text,
        )
    return text_of(record[fields.text], fields.text, where)


def _record_id(record: dict[str, Any], id_field: str, where: str, number: int, *, named: bool) -> str:
    if not id_field:
        return str(number)
    if id_field not in record:
        why = "--id-field names it" if named else "the first record has one, so every record needs one"
        raise InvalidRequest(f"{where}: no {id_field!r} field ({why})", param=id_field)
    return id_of(record[id_field], id_field, where)


def _csv(path: Path, fields: Fields) -> Iterator[Row]:
    """A header row, then a record each (a quoted field may span lines: a record is named by the line
    it starts on). Without --id-field, an "id" column gives the ids, else each record's line number.
    The header is checked before the first record is asked for (the file is opened once: it may be a
    pipe)."""
    records = _csv_records(path, fields)
    checked = next(records)  # the header, up to the first record
    assert checked is None
    return records  # type: ignore[return-value]  # (only Rows from here on)


def _csv_records(path: Path, fields: Fields) -> Iterator[Row | None]:
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        yield from csv_records(Source(path, "line"), fh, fields)


def csv_records(source: Source, fh: Iterable[str], fields: Fields) -> Iterator[Row | None]:
    """The CSV records of a text stream opened with newline="" (its header checked: None, then the
    Rows)."""
    path = source.path
    reader = csv.reader(fh)
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{source.where(1)}: {exc}") from None
    if header is None:
        raise ConfigError(f"input {path.name} is empty: a CSV input starts with a header row")
    text_at = _column(header, fields.text, path, "--text-field")
    id_name = (
        fields.id if fields.id is not None else (DEFAULT_ID_FIELD if DEFAULT_ID_FIELD in header else None)
    )
    id_at = None if id_name is None else _column(header, id_name, path, "--id-field")
    yield None
    consumed = reader.line_num
    while True:
        number = consumed + 1
        try:
            record = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"{source.where(number)}: {exc}") from None
        if record is None:
            return
        consumed = reader.line_num
        if not record:  # a blank line
            continue
        where = source.where(number)
        if text_at >= len(record) or (id_at is not None and id_at >= len(record)):
            missing = fields.text if text_at >= len(record) else id_name
            raise InvalidRequest(
                f"{where}: {len(record)} fields, fewer than the header's: no {missing!r} value"
            )
        row_id = str(number) if id_at is None or id_name is None else id_of(record[id_at], id_name, where)
        yield Row(row_id, record[text_at], number)


def _column(header: list[str], name: str, path: Path, flag: str) -> int:
    if name not in header:
        raise _no_column(path, name, flag, header)
    return header.index(name)


def _no_column(path: Path, name: str, flag: str, columns: list[str]) -> ConfigError:
    return ConfigError(
        f"input {path.name} has no column {name!r} ({flag} names it; its columns: {', '.join(columns)})"
    )


def _parquet(path: Path, fields: Fields) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"input {path.name} is not a Parquet file ({exc})") from None
    id_name = parquet_id_column(schema, fields, path)
    return _parquet_records(Source(path, "row"), fields.text, id_name)


def parquet_id_column(schema: Any, fields: Fields, path: Path) -> str | None:
    """The text and id columns checked against a Parquet schema -> the id column: --id-field, else an
    "id" column (strings or integers), else None (each row's number, from 1)."""
    _check_column(schema, fields.text, path, "--text-field", ids=False)
    id_name = (
        fields.id
        if fields.id is not None
        else (DEFAULT_ID_FIELD if DEFAULT_ID_FIELD in schema.names else None)
    )
    if id_name is not None:
        _check_column(schema, id_name, path, "--id-field", ids=True)
    return id_name


def _check_column(schema: Any, name: str, path: Path, flag: str, *, ids: bool) -> None:
    import pyarrow as pa

    if name not in schema.names:
        raise _no_column(path, name, flag, schema.names)
    kind = schema.field(name).type
    strings = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    if not (strings or (ids and pa.types.is_integer(kind))):
        wanted = "strings or integers" if ids else "strings"
        raise ConfigError(f"input {path.name}: column {name!r} holds {kind}, not {wanted}")


def _parquet_records(source: Source, text_name: str, id_name: str | None) -> Iterator[Row]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(source.path) as parquet:
        yield from parquet_rows(source, parquet, text_name, id_name)


def parquet_rows(
    source: Source,
    parquet: Any,
    text_name: str,
    id_name: str | None,
    *,
    row_groups: list[int] | None = None,
    first: int = 1,
) -> Iterator[Row]:
    """The rows of an open pyarrow ParquetFile (of `row_groups` only, the first of them row `first`),
    a record batch of the text and id columns at a time."""
    columns = list(dict.fromkeys([text_name] + ([id_name] if id_name is not None else [])))
    number = first - 1
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns, row_groups=row_groups):
        texts = batch.column(text_name).to_pylist()
        ids = batch.column(id_name).to_pylist() if id_name is not None else None
        for index, text in enumerate(texts):
            number += 1
            where = source.where(number)
            if text is None:
                raise InvalidRequest(f"{where}: {text_name!r} is null, not a string", param=text_name)
            row_id = str(number) if ids is None or id_name is None else id_of(ids[index], id_name, where)
            yield Row(row_id, text, number)
