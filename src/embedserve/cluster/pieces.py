"""A corpus job's input (a file, a folder or a glob on any filesystem pyarrow reaches) and its split into
deterministic pieces, one shard each: Parquet by row groups, JSONL and text by byte ranges cut at line
breaks, CSV a file each (a quoted field may span lines, so no byte is a safe cut). Design note 54."""

from __future__ import annotations

import csv
import fnmatch
import io
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from embedserve.corpus.formats import InputFormat, input_format
from embedserve.corpus.readers import csv_records, jsonl_rows, parquet_id_column, parquet_rows, text_rows
from embedserve.corpus.rows import DEFAULT_ID_FIELD, Fields, Row, Source
from embedserve.errors import ConfigError

#: JSONL and text pieces are about this many bytes: a shard of some thousands of rows, small enough that
#: a killed run redoes little and every actor gets several.
PIECE_BYTES = 8 << 20
#: Bytes read at a time: a cut's window (to the next line break), a piece's lines.
WINDOW = 1 << 16
BLOCK = 1 << 20
_GLOB = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class InputFile:
    path: str  # on its filesystem
    name: str  # as messages (and numbered ids, when there are several files) name it
    size: int
    format: InputFormat


@dataclass(frozen=True, slots=True)
class Piece:
    """One shard's worth of one file: bytes [start, end) (JSONL, text, CSV), or row groups [start, end)
    (Parquet); `first` is the number (line or row) of its first record."""

    key: str  # the shard's name: OUT/{key}.parquet
    path: str
    name: str
    format: InputFormat
    start: int
    end: int
    first: int = 1
    #: JSONL: the id field the file's first record decided ("id" or ""); Parquet: the id column.
    id_field: str | None = None
    #: Several files: numbered ids (no id field) become "NAME:NUMBER", unique across the files.
    prefix: str = ""

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @staticmethod
    def from_json(raw: str) -> Piece:
        return Piece(**orjson.loads(raw))


def open_filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) of a local path or a URI (s3://, gs://, file://, hdfs://)."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), os.path.abspath(uri)
    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError or ValueError by scheme
        raise ConfigError(f"cannot open {uri!r}: {exc}") from None
    return filesystem, str(path)


def find_inputs(uri: str, given: InputFormat | None) -> tuple[Any, list[InputFile]]:
    """The input's files, sorted: the file; every file under a folder (but hidden ones and `_`-named
    markers such as _SUCCESS); or those a glob matches (`*` within one path segment)."""
    from pyarrow import fs

    parts = uri.split("/")
    globbed = next((i for i, part in enumerate(parts) if _GLOB & set(part)), None)
    base_uri = uri if globbed is None else "/".join(parts[:globbed]) or "."
    filesystem, base = open_filesystem(base_uri)
    info = filesystem.get_file_info(base)
    if info.type == fs.FileType.NotFound:
        raise ConfigError(f"no input {uri!r}")
    if globbed is None and info.type == fs.FileType.File:
        return filesystem, [
            InputFile(base, PurePosixPath(base).name, info.size, input_format(Path(base), given))
        ]
    if info.type != fs.FileType.Directory:
        raise ConfigError(f"no input {uri!r}")
    pattern = parts[globbed:] if globbed is not None else None
    found = []
    for entry in filesystem.get_file_info(fs.FileSelector(base, recursive=True)):
        relative = PurePosixPath(entry.path).relative_to(PurePosixPath(base))
        if entry.type != fs.FileType.File or any(p.startswith((".", "_")) for p in relative.parts):
            continue
        if pattern is None or _matches(relative.parts, pattern):
            found.append(
                InputFile(entry.path, str(relative), entry.size, input_format(Path(entry.path), given))
            )
    if not found:
        raise ConfigError(f"no file matches {uri!r}" if pattern else f"input folder {uri!r} has no files")
    return filesystem, sorted(found, key=lambda f: f.name)


def _matches(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    return len(parts) == len(pattern) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern, strict=True)
    )


def plan_pieces(
    filesystem: Any, files: Sequence[InputFile], fields: Fields, piece_bytes: int = PIECE_BYTES
) -> list[Piece]:
    """Every file's pieces, in input order, numbered by `first` only where that needs no reading (byte
    ranges get theirs from `numbered`, once their line breaks are counted). What can be checked from a
    file's head is checked now: its fields (a CSV header, a Parquet schema), a JSONL first record."""
    several = len(files) > 1
    pieces: list[Piece] = []
    for index, file in enumerate(files):
        if file.format == "text" and fields != Fields():
            raise ConfigError(
                "plain text input has no fields: --text-field and --id-field are for JSONL, CSV, Parquet"
            )
        stem = f"part-{index:05d}"
        prefix = f"{file.name}:" if several else ""
        if file.format == "parquet":
            pieces.extend(_parquet_pieces(filesystem, file, fields, stem, prefix))
            continue
        if file.format == "csv":
            numbered = _csv_numbered(filesystem, file, fields)
            key, owned = f"{stem}-00000", prefix if numbered else ""
            pieces.append(Piece(key, file.path, file.name, "csv", 0, file.size, prefix=owned))
            continue
        decided = _jsonl_decided(filesystem, file, fields) if file.format == "jsonl" else ""
        numbered = file.format == "text" or (fields.id is None and decided == "")
        cuts = cut_points(filesystem, file.path, file.size, piece_bytes)
        for at, (start, end) in enumerate(itertools.pairwise(cuts)):
            key, owned = f"{stem}-{at:05d}", prefix if numbered else ""
            pieces.append(
                Piece(key, file.path, file.name, file.format, start, end, id_field=decided, prefix=owned)
            )
    return pieces


def cut_points(filesystem: Any, path: str, size: int, piece_bytes: int) -> list[int]:
    """0, the byte after the first line break at or past each multiple of `piece_bytes`, and `size`:
    read a window at each cut, never the whole file (a line longer than a piece makes one piece)."""
    cuts = [0]
    with filesystem.open_input_file(path) as fh:
        for target in range(piece_bytes, size, piece_bytes):
            if target <= cuts[-1]:
                continue
            at = target - 1
            while at < size:
                fh.seek(at)
                window = fh.read(WINDOW)
                if not window:
                    break
                found = window.find(b"\n")
                if found >= 0:
                    at += found + 1
                    break
                at += len(window)
            if cuts[-1] < at < size:
                cuts.append(at)
    return [*cuts, size] if size > 0 else [0, 0]


def lines_in(fh: Any, start: int, end: int) -> Iterator[bytes]:
    """The lines (with their breaks) of bytes [start, end) of a seekable file, a block at a time."""
    fh.seek(start)
    left, tail = end - start, b""
    while left > 0:
        block = fh.read(min(BLOCK, left))
        if not block:
            break
        left -= len(block)
        lines = (tail + block).split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield line + b"\n"
    if tail:
        yield tail


def count_lines(filesystem: Any, piece: Piece) -> int:
    """The line breaks in a byte-range piece (its last line has one unless it ends the file)."""
    count = 0
    with filesystem.open_input_file(piece.path) as fh:
        fh.seek(piece.start)
        left = piece.end - piece.start
        while left > 0 and (block := fh.read(min(BLOCK, left))):
            left -= len(block)
            count += block.count(b"\n")
    return count


def numbered(pieces: Sequence[Piece], breaks: Sequence[int]) -> list[Piece]:
    """Pure: byte-range pieces with the line number of their first line, from each piece's count of
    line breaks (`breaks`, in order; Parquet and CSV pieces keep theirs)."""
    out, line, path = [], 1, None
    for piece, count in zip(pieces, breaks, strict=True):
        if piece.format not in ("jsonl", "text"):
            out.append(piece)
            continue
        if piece.path != path:
            line, path = 1, piece.path
        out.append(_replace(piece, first=line))
        line += count
    return out


def _replace(piece: Piece, **changes: Any) -> Piece:
    return Piece(**{**asdict(piece), **changes})


def _parquet_pieces(filesystem: Any, file: InputFile, fields: Fields, stem: str, prefix: str) -> list[Piece]:
    """A piece a row group, numbered from the footer's row counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with filesystem.open_input_file(file.path) as fh:
            meta = pq.read_metadata(fh)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"input {file.name} is not a Parquet file ({exc})") from None
    id_name = parquet_id_column(meta.schema.to_arrow_schema(), fields, Path(file.name))
    pieces, first = [], 1
    for group in range(meta.num_row_groups):
        pieces.append(
            Piece(
                f"{stem}-{group:05d}",
                file.path,
                file.name,
                "parquet",
                group,
                group + 1,
                first,
                id_name,
                prefix if id_name is None else "",
            )
        )
        first += meta.row_group(group).num_rows
    return pieces


def _jsonl_decided(filesystem: Any, file: InputFile, fields: Fields) -> str | None:
    """What the file's first record decides without --id-field: "id" when it has an "id" field, else
    "" (numbered); None when it is not a JSON object (its piece names that error)."""
    if fields.id is not None:
        return fields.id
    with filesystem.open_input_file(file.path) as fh:
        for line in lines_in(fh, 0, file.size):
            if line.strip():
                try:
                    record = orjson.loads(line.removeprefix(b"\xef\xbb\xbf"))
                except orjson.JSONDecodeError:
                    return None
                return (
                    (DEFAULT_ID_FIELD if DEFAULT_ID_FIELD in record else "")
                    if isinstance(record, dict)
                    else None
                )
    return ""


def _csv_numbered(filesystem: Any, file: InputFile, fields: Fields) -> bool:
    """Whether a CSV's ids are its line numbers (no --id-field and no "id" column in its header)."""
    if fields.id is not None:
        return False
    with filesystem.open_input_file(file.path) as fh:
        head = fh.read(WINDOW).decode("utf-8-sig", errors="replace")
    header = next(csv.reader(io.StringIO(head, newline="")), [])
    return DEFAULT_ID_FIELD not in header


def rows_of(filesystem: Any, piece: Piece, fields: Fields) -> Iterator[Row]:
    """A piece's rows, read as the local command's readers read a file (the same ids and checks), with
    the numbers of the whole file; numbered ids prefixed with the file's name when there are several."""
    unit = "row" if piece.format == "parquet" else "line"
    source = Source(Path(piece.name), unit)
    rows = _piece_rows(filesystem, piece, fields, source)
    if not piece.prefix:
        return rows
    return (Row(piece.prefix + row.id, row.text, row.number) for row in rows)


def _piece_rows(filesystem: Any, piece: Piece, fields: Fields, source: Source) -> Iterator[Row]:
    if piece.format == "parquet":
        import pyarrow.parquet as pq

        with filesystem.open_input_file(piece.path) as fh, pq.ParquetFile(fh) as parquet:
            yield from parquet_rows(
                source,
                parquet,
                fields.text,
                piece.id_field,
                row_groups=list(range(piece.start, piece.end)),
                first=piece.first,
            )
        return
    if piece.format == "csv":
        with filesystem.open_input_stream(piece.path) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            for row in csv_records(source, text, fields):
                if row is not None:
                    yield row
        return
    with filesystem.open_input_file(piece.path) as fh:
        lines = lines_in(fh, piece.start, piece.end)
        if piece.format == "text":
            yield from text_rows(source, lines, piece.first)
        else:
            yield from jsonl_rows(source, lines, fields, first=piece.first, decided=piece.id_field)
