"""What a batch on Ray keeps in the batch store (a folder, or any URI pyarrow reaches: `s3://...`): its
plan (the line ranges to run, and where the input is), the staged input, and one result shard per
deterministic range of lines, each written whole under a temporary name and moved into place."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from embedserve.batches.execute import Ran
from embedserve.batches.lines import RequestLine

#: Lines per range (and per shard, and per commit): a range's lines are 1 + k * SHARD_LINES onwards, the
#: same however often the batch is resubmitted, so a shard found after a crash names its lines alone.
SHARD_LINES = 64
PLAN = "plan.json"
INPUT = "input.jsonl"
_SHARD_PREFIX, _SHARD_SUFFIX = "range-", ".parquet"
_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("ok", pa.bool_()),
        ("text", pa.binary()),
        ("tokens", pa.int64()),
        ("inputs", pa.int64()),
        ("model", pa.string()),
        ("request_id", pa.string()),
        ("created_at", pa.float64()),
        ("latency_ms", pa.float64()),
    ]
)


def batch_dir(root: str, batch_id: str) -> str:
    """The batch's folder in the store at `root` (a path or a URI)."""
    return f"{root.rstrip('/')}/{batch_id}"


def range_of(line: int) -> int:
    return (line - 1) // SHARD_LINES


def by_range(lines: Iterable[RequestLine]) -> dict[int, list[RequestLine]]:
    ranges: dict[int, list[RequestLine]] = {}
    for line in lines:
        ranges.setdefault(range_of(line.line), []).append(line)
    return ranges


def _open(uri: str) -> tuple[Any, str]:
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, str(path)


def _put(uri: str, data: bytes) -> None:
    """Write `data` whole to `uri`: under a temporary name, then moved (a rename on a local disk; an
    object store's copy appears whole)."""
    fs, path = _open(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def stage(source: str, uri: str) -> None:
    """Copy the input file at `source` (a local path) to `uri`, whole or not at all."""
    fs, path = _open(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    pafs.copy_files(source, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    fs.move(tmp, path)


def write_plan(where: str, input_uri: str, ranges: dict[int, list[RequestLine]]) -> None:
    plan = {
        "input": input_uri,
        "ranges": [
            [k, [[r.line, r.custom_id, r.offset, r.length, r.inputs, r.token_bound] for r in lines]]
            for k, lines in sorted(ranges.items())
        ],
    }
    _put(f"{where}/{PLAN}", orjson.dumps(plan))


def read_plan(where: str) -> tuple[str, list[tuple[int, list[RequestLine]]]]:
    """-> (the input's URI, the ranges to run with their lines)."""
    fs, path = _open(f"{where}/{PLAN}")
    with fs.open_input_stream(path) as stream:
        plan = orjson.loads(stream.read())
    return plan["input"], [(k, [RequestLine(*row) for row in rows]) for k, rows in plan["ranges"]]


def read_lines(input_uri: str, lines: Sequence[RequestLine]) -> list[bytes]:
    """The lines' bytes, by their offsets in the input."""
    fs, path = _open(input_uri)
    with fs.open_input_file(path) as file:
        return [file.read_at(line.length, line.offset) for line in lines]


def write_shard(where: str, k: int, lines: Sequence[Ran]) -> None:
    columns = {name: [getattr(ran, name) for ran in lines] for name in _SCHEMA.names}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns, schema=_SCHEMA), sink)
    _put(f"{where}/{_SHARD_PREFIX}{k:08d}{_SHARD_SUFFIX}", sink.getvalue().to_pybytes())


def read_shard(uri: str) -> list[Ran]:
    fs, path = _open(uri)
    with fs.open_input_file(path) as file:
        rows = pq.read_table(file, schema=_SCHEMA).to_pylist()
    return [Ran(**row) for row in rows]


def shards(where: str) -> dict[int, str]:
    """The shards written so far: range -> URI."""
    fs, path = _open(where)
    found: dict[int, str] = {}
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        name = info.base_name
        if (
            info.type == pafs.FileType.File
            and name.startswith(_SHARD_PREFIX)
            and name.endswith(_SHARD_SUFFIX)
        ):
            found[int(name[len(_SHARD_PREFIX) : -len(_SHARD_SUFFIX)])] = f"{where}/{name}"
    return found


def remove(uri: str) -> None:
    fs, path = _open(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
