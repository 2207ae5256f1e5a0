"""The Parquet output: columns id (string), embedding (fixed_size_list<float32>[D]) and tokens (int32).
While it runs, each checkpoint is one finished part file in `OUT.parts/` (written aside, synced, then
renamed in); the end merges the parts into OUT, a record batch at a time, and removes them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedserve.corpus.output import RunInfo, check_width, remove, replace_durably, sync_file
from embedserve.durable import fsync_dir
from embedserve.errors import ConfigError
from embedserve.types import FloatMatrix

#: The schema metadata key that holds the RunInfo of the run that made the vectors.
INFO_KEY = b"embedserve"
_PART = "part-{:08d}.parquet"


def schema_of(info: RunInfo) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), info.dimensions), nullable=False),
            pa.field("tokens", pa.int32(), nullable=False),
        ],
        metadata={INFO_KEY: orjson.dumps(_info_json(info))},
    )


def record_batch(
    schema: pa.Schema, ids: Sequence[str], vectors: FloatMatrix, tokens: Sequence[int]
) -> pa.RecordBatch:
    """Rows of the output's columns (`schema_of`): [N] ids, [N, D] vectors, [N] token counts."""
    dimensions = schema.field("embedding").type.list_size
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
    return pa.RecordBatch.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, dimensions),
            pa.array(np.asarray(tokens, dtype=np.int32), pa.int32()),
        ],
        schema=schema,
    )


def _info_json(info: RunInfo) -> dict[str, Any]:
    return {
        "model": info.model,
        "dimensions": info.dimensions,
        "input_type": info.input_type,
        "instruction": info.instruction,
    }


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _merging(path: Path) -> Path:
    return path.with_name(path.name + ".merging")


class ParquetOutput:
    def __init__(self, path: Path, info: RunInfo, checkpoint_rows: int) -> None:
        self.path = path
        self.info = info
        self.rows = 0
        self._schema = schema_of(info)
        self._parts = parts_dir(path)
        self._checkpoint_rows = checkpoint_rows
        self._found: list[Path] = []
        self._next_part = 1
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0

    @staticmethod
    def existing(path: Path) -> list[Path]:
        return [p for p in (path, parts_dir(path), _merging(path)) if p.exists()]

    @staticmethod
    def open(path: Path, info: RunInfo, checkpoint_rows: int, *, resume: bool) -> ParquetOutput:
        output = ParquetOutput(path, info, checkpoint_rows)
        if resume:
            output._recover()
        return output

    def _recover(self) -> None:
        """Finished parts only: a part is renamed in once whole, so `*.tmp` files and a merge cut short
        are thrown away. A finished OUT (the merge renamed it in) wins over parts left behind, and is
        this run's first part: moved in as part 0 once a row follows it, so that a resume refused, or
        with nothing to add, leaves it where it is."""
        remove(_merging(self.path))
        if self.path.exists():
            remove(self._parts)
            self._found = [self.path]
        else:
            for tmp in self._parts.glob("*.tmp"):
                tmp.unlink()
            self._found = sorted(self._parts.glob("part-*.parquet"))
        for part in self._found:
            try:
                meta = pq.read_metadata(part)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ConfigError(f"cannot resume: {part} is not a Parquet file ({exc})") from None
            self._check(part, meta.schema.to_arrow_schema())
            self.rows += meta.num_rows
        if self._found and self._found[-1] != self.path:
            self._next_part = int(self._found[-1].stem.removeprefix("part-")) + 1

    def _check(self, part: Path, schema: pa.Schema) -> None:
        raw = (schema.metadata or {}).get(INFO_KEY)
        if raw is None or schema.names != self._schema.names:
            raise ConfigError(f"cannot resume: {part} is not an `embedserve embed` output")
        found = orjson.loads(raw)
        check_width(self.path, int(found["dimensions"]), self.info)
        wanted = _info_json(self.info)
        if found != wanted:
            differ = ", ".join(
                f"{k} {found.get(k)!r} (now {v!r})" for k, v in wanted.items() if found.get(k) != v
            )
            raise ConfigError(
                f"cannot resume: {self.path.name} was made with {differ}: resume with the same flags, or "
                "--overwrite"
            )

    def done_ids(self) -> Iterator[str]:
        for part in self._found:
            with pq.ParquetFile(part) as parquet:
                for batch in parquet.iter_batches(batch_size=self._checkpoint_rows, columns=["id"]):
                    yield from batch.column(0).to_pylist()

    def write(self, ids: Sequence[str], vectors: FloatMatrix, tokens: Sequence[int]) -> None:
        batch = record_batch(self._schema, ids, vectors, tokens)
        self._buffer.append(batch)
        self._buffered += len(ids)
        self.rows += len(ids)
        if self._buffered >= self._checkpoint_rows:
            self.checkpoint()

    def checkpoint(self) -> None:
        """The buffered rows as the next part: written aside, synced, renamed in."""
        if not self._buffer:
            return
        self._parts.mkdir(exist_ok=True)
        if self._found == [self.path]:  # rows after a finished output's: it becomes part 0
            replace_durably(self.path, self._parts / _PART.format(0))
            self._found = [self._parts / _PART.format(0)]
        final = self._parts / _PART.format(self._next_part)
        tmp = final.with_name(final.name + ".tmp")
        with tmp.open("wb") as fh:
            pq.write_table(pa.Table.from_batches(self._buffer, schema=self._schema), fh)
            sync_file(fh)
        replace_durably(tmp, final)
        self._found.append(final)
        self._next_part += 1
        self._buffer, self._buffered = [], 0

    def finish(self) -> None:
        """The parts, in order, merged into one file beside OUT, synced and renamed to OUT; then the
        parts go. A kill before the rename leaves the parts (a resume merges again), after it OUT."""
        self.checkpoint()
        if self._found == [self.path]:  # a finished output, nothing added
            return
        merging = _merging(self.path)
        with merging.open("wb") as fh:
            with pq.ParquetWriter(fh, self._schema) as writer:
                for part in self._found:
                    with pq.ParquetFile(part) as parquet:
                        for batch in parquet.iter_batches(batch_size=self._checkpoint_rows):
                            writer.write_batch(batch)
            sync_file(fh)
        replace_durably(merging, self.path)
        remove(self._parts)
        fsync_dir(self.path.parent)
