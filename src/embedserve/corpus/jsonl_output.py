"""The JSONL output: a line `{"id", "embedding", "tokens"}` a row, appended, synced at each checkpoint.
Each line is written whole with its line break, so a kill can leave only a torn last line, which a
resume cuts off."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from embedserve.corpus.output import RunInfo, check_width, sync_file
from embedserve.errors import ConfigError
from embedserve.types import FloatMatrix

_BLOCK = 1 << 20


def complete_length(path: Path) -> tuple[int, int]:
    """(bytes up to the end of the last whole line, whole lines), reading a block at a time from the
    end for the first and from the start for the second."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        end = size
        while end > 0:
            start = max(0, end - _BLOCK)
            fh.seek(start)
            block = fh.read(end - start)
            at = block.rfind(b"\n")
            if at >= 0:
                end = start + at + 1
                break
            end = start
        fh.seek(0)
        lines, left = 0, end
        while left > 0:
            block = fh.read(min(_BLOCK, left))
            lines += block.count(b"\n")
            left -= len(block)
    return end, lines


class JsonlOutput:
    def __init__(self, path: Path, info: RunInfo, checkpoint_rows: int) -> None:
        self.path = path
        self.info = info
        self.rows = 0
        self._checkpoint_rows = checkpoint_rows
        self._found = 0
        self._buffer: list[bytes] = []

    @staticmethod
    def existing(path: Path) -> list[Path]:
        return [path] if path.exists() else []

    @staticmethod
    def open(path: Path, info: RunInfo, checkpoint_rows: int, *, resume: bool) -> JsonlOutput:
        output = JsonlOutput(path, info, checkpoint_rows)
        if resume:
            end, output._found = complete_length(path)
            with path.open("r+b") as fh:  # the torn last line, if any, goes
                fh.truncate(end)
                sync_file(fh)
            output.rows = output._found
            if output._found:
                with path.open("rb") as fh:
                    check_width(path, len(_parse(fh.readline(), path, 1)["embedding"]), info)
        return output

    def done_ids(self) -> Iterator[str]:
        with self.path.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                if number > self._found:
                    return
                yield str(_parse(line, self.path, number)["id"])

    def write(self, ids: Sequence[str], vectors: FloatMatrix, tokens: Sequence[int]) -> None:
        for row_id, vector, count in zip(ids, vectors.astype(np.float32, copy=False), tokens, strict=True):
            line = {"id": row_id, "embedding": vector, "tokens": int(count)}
            self._buffer.append(
                orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
            )
        self.rows += len(ids)
        if len(self._buffer) >= self._checkpoint_rows:
            self.checkpoint()

    def checkpoint(self) -> None:
        if not self._buffer:
            return
        with self.path.open("ab") as fh:
            fh.write(b"".join(self._buffer))
            sync_file(fh)
        self._buffer = []

    def finish(self) -> None:
        self.checkpoint()
        self.path.touch()  # (a corpus of no rows: an empty output)


def _parse(line: bytes, path: Path, number: int) -> dict[str, Any]:
    """A line this output wrote, else a resume is refused (the file is someone else's)."""
    try:
        row = orjson.loads(line)
        if isinstance(row, dict) and "id" in row and isinstance(row.get("embedding"), list):
            return row
    except orjson.JSONDecodeError:
        pass
    raise ConfigError(
        f"cannot resume: {path.name} line {number} is not a row of an `embedserve embed` output"
    )
