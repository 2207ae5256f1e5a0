"""A corpus job's output: a folder of Parquet shards, one a piece, with the local command's columns (id,
embedding, tokens) and schema metadata; each written aside and renamed in whole (on an object store, one
put), so a shard that exists is complete and a rerun skips its piece."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from embedserve.corpus.output import RunInfo, replace_durably, sync_file
from embedserve.corpus.parquet_output import record_batch, schema_of
from embedserve.types import FloatMatrix

#: The schema metadata key of where a shard came from: its piece and the Ray node that embedded it.
SHARD_KEY = b"embedserve.shard"
SUFFIX = ".parquet"


def shard_path(out: str, key: str) -> str:
    return f"{out}/{key}{SUFFIX}"


def written_keys(filesystem: Any, out: str) -> set[str]:
    """The pieces whose shards are in `out` (temporary files, hidden, are not shards)."""
    from pyarrow import fs

    info = filesystem.get_file_info(fs.FileSelector(out, allow_not_found=True))
    names = (Path(entry.path).name for entry in info)
    return {name.removesuffix(SUFFIX) for name in names if name.endswith(SUFFIX) and name[0] not in "._"}


class ShardOutput:
    """The corpus Output (corpus/output.py) of one piece: rows streamed into a hidden temporary file,
    which `finish` makes the shard. Checkpoints are no-ops: a piece is redone whole after a kill."""

    def __init__(self, filesystem: Any, out: str, key: str, info: RunInfo, origin: dict[str, Any]) -> None:
        from pyarrow import fs

        self.path = Path(shard_path(out, key))
        self.info = info
        self.rows = 0
        base = schema_of(info)
        self._schema = base.with_metadata({**(base.metadata or {}), SHARD_KEY: orjson.dumps(origin)})
        self._filesystem = filesystem
        self._local = isinstance(filesystem, fs.LocalFileSystem)
        self._final = shard_path(out, key)
        # On an object store a put is atomic already: the object appears whole or not at all.
        self._tmp = f"{out}/.{key}{SUFFIX}.{uuid.uuid4().hex}.tmp" if self._local else self._final
        self._stream = filesystem.open_output_stream(self._tmp)
        self._writer = pq.ParquetWriter(self._stream, self._schema)

    def done_ids(self) -> Iterator[str]:
        return iter(())

    def write(self, ids: Sequence[str], vectors: FloatMatrix, tokens: Sequence[int]) -> None:
        batch = record_batch(self._schema, ids, vectors, tokens)
        self._writer.write_batch(batch)
        self.rows += len(ids)

    def checkpoint(self) -> None:
        pass

    def finish(self) -> None:
        self._writer.close()
        if not self._local:
            self._stream.close()
            return
        self._stream.close()
        with open(self._tmp, "rb+") as fh:  # closed streams do not fsync: this does
            sync_file(fh)
        replace_durably(Path(self._tmp), Path(self._final))

    def discard(self) -> None:
        """A piece that failed leaves no shard (and no temporary file)."""
        try:
            self._writer.close()
            self._stream.close()
        finally:
            if self._local:
                Path(self._tmp).unlink(missing_ok=True)
            else:  # closing an object store's stream puts the object: take it back
                self._filesystem.delete_file(self._final)
