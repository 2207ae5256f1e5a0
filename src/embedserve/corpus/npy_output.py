"""The .npy output: OUT holds float32 [N, D] (row i is the vector of line i of the sidecar), and the
sidecar OUT's-stem.ids.jsonl a line `{"id", "tokens"}` a row. Vectors are appended after a header of
fixed size, rewritten with N at each checkpoint (a killed output still loads, with the rows of its last
checkpoint); a resume keeps the rows both files hold whole and cuts the rest."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import orjson

from embedserve.corpus.jsonl_output import complete_length
from embedserve.corpus.output import RunInfo, check_width, sync_file
from embedserve.errors import ConfigError
from embedserve.types import FloatMatrix

MAGIC = b"\x93NUMPY\x01\x00"
#: The whole header (magic, length, dict, padding): room for any row count, a multiple of 64 as
#: numpy aligns its own.
HEADER_BYTES = 128


def npy_header(rows: int, dimensions: int) -> bytes:
    """Pure: the .npy (format 1.0) header of a C-order float32 [rows, dimensions] array, HEADER_BYTES
    long whatever `rows` is, so that it can be rewritten in place."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dimensions}), }}"
    body = text.encode("latin1").ljust(HEADER_BYTES - len(MAGIC) - 2 - 1) + b"\n"
    return MAGIC + len(body).to_bytes(2, "little") + body


def read_npy_header(header: bytes, path: Path) -> tuple[int, int]:
    """Pure: (rows, dimensions) of a header `npy_header` wrote; anything else is refused."""
    length = int.from_bytes(header[len(MAGIC) : len(MAGIC) + 2], "little")
    try:
        if not header.startswith(MAGIC) or length != HEADER_BYTES - len(MAGIC) - 2:
            raise ValueError("not our header")
        fields = ast.literal_eval(header[len(MAGIC) + 2 :].decode("latin1").strip())
        rows, dimensions = fields["shape"]
        if fields["descr"] != "<f4" or fields["fortran_order"]:
            raise ValueError("not float32 in C order")
        return int(rows), int(dimensions)
    except (ValueError, SyntaxError, KeyError, TypeError):
        raise ConfigError(f"cannot resume: {path.name} is not an output of `embedserve embed`") from None


def sidecar(path: Path) -> Path:
    """vectors.npy -> vectors.ids.jsonl (an OUT without the .npy extension: OUT.ids.jsonl)."""
    return path.with_name((path.stem if path.suffix == ".npy" else path.name) + ".ids.jsonl")


class NpyOutput:
    def __init__(self, path: Path, info: RunInfo, checkpoint_rows: int) -> None:
        self.path = path
        self.info = info
        self.rows = 0
        self._ids = sidecar(path)
        self._checkpoint_rows = checkpoint_rows
        self._found = 0
        self._durable = 0
        self._vectors: list[FloatMatrix] = []
        self._lines: list[bytes] = []

    @staticmethod
    def existing(path: Path) -> list[Path]:
        return [p for p in (path, sidecar(path)) if p.exists()]

    @staticmethod
    def open(path: Path, info: RunInfo, checkpoint_rows: int, *, resume: bool) -> NpyOutput:
        output = NpyOutput(path, info, checkpoint_rows)
        if resume:
            output._recover()
        return output

    def _create(self) -> None:
        """The files, at the first checkpoint: a run that fails before any row leaves none."""
        with self.path.open("wb") as fh:
            fh.write(npy_header(0, self.info.dimensions))
            sync_file(fh)
        self._ids.touch()

    def _recover(self) -> None:
        """Rows whole in both files: vectors are synced before their ids at each checkpoint, so the ids
        say how many rows are complete (fewer, if the vectors were cut short some other way)."""
        row_bytes = 4 * self.info.dimensions
        if not self.path.exists() or self.path.stat().st_size < HEADER_BYTES:  # killed in _create
            self._create()
        with self.path.open("rb") as fh:
            _, dimensions = read_npy_header(fh.read(HEADER_BYTES), self.path)
        check_width(self.path, dimensions, self.info)
        vectors = (self.path.stat().st_size - HEADER_BYTES) // row_bytes
        if not self._ids.exists():
            self._ids.write_bytes(b"")
        end, lines = complete_length(self._ids)
        rows = min(vectors, lines)
        if lines > rows:  # (ids past the vectors: only if the vectors file was cut short)
            with self._ids.open("rb") as fh:
                end = sum(len(fh.readline()) for _ in range(rows))
        with self._ids.open("r+b") as fh:
            fh.truncate(end)
            sync_file(fh)
        with self.path.open("r+b") as fh:
            fh.truncate(HEADER_BYTES + rows * row_bytes)
            fh.seek(0)
            fh.write(npy_header(rows, dimensions))
            sync_file(fh)
        self._found = self._durable = self.rows = rows

    def done_ids(self) -> Iterator[str]:
        with self._ids.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                if number > self._found:
                    return
                try:
                    yield str(orjson.loads(line)["id"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(
                        f"cannot resume: {self._ids.name} line {number} is not a row of an "
                        "`embedserve embed` output"
                    ) from None

    def write(self, ids: Sequence[str], vectors: FloatMatrix, tokens: Sequence[int]) -> None:
        self._vectors.append(np.ascontiguousarray(vectors, dtype="<f4"))
        self._lines.extend(
            orjson.dumps({"id": row_id, "tokens": int(count)}, option=orjson.OPT_APPEND_NEWLINE)
            for row_id, count in zip(ids, tokens, strict=True)
        )
        self.rows += len(ids)
        if len(self._lines) >= self._checkpoint_rows:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Vectors appended and synced, then their ids, then the header's row count."""
        if not self._lines:
            return
        if not self.path.exists():
            self._create()
        with self.path.open("r+b") as fh:
            fh.seek(HEADER_BYTES + self._durable * 4 * self.info.dimensions)
            for block in self._vectors:
                fh.write(block.tobytes())
            sync_file(fh)
            with self._ids.open("ab") as ids:
                ids.write(b"".join(self._lines))
                sync_file(ids)
            self._durable += len(self._lines)
            fh.seek(0)
            fh.write(npy_header(self._durable, self.info.dimensions))
            sync_file(fh)
        self._vectors, self._lines = [], []

    def finish(self) -> None:
        self.checkpoint()
        if not self.path.exists():  # (a corpus of no rows: an empty [0, D] array)
            self._create()
