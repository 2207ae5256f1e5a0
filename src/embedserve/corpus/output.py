"""What every output of `embedserve embed` is: rows appended in input order and made durable at each
checkpoint, so that a kill at any moment leaves the rows of the last checkpoint recoverable; how a run
opens one (new, resumed or replaced); and the check that a resumed input starts with the rows already
written (design note 52)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from embedserve.corpus.formats import OutputFormat
from embedserve.corpus.rows import Row, Source
from embedserve.durable import fsync_dir
from embedserve.errors import ConfigError
from embedserve.types import FloatMatrix

#: Vectors buffered between checkpoints unless --checkpoint-rows says: about 16 MiB of float32.
CHECKPOINT_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What made the vectors. Every output checks the width on resume; Parquet keeps all of it in its
    schema metadata and refuses a resume that differs."""

    model: str
    dimensions: int  # the vectors' width
    input_type: str | None = None
    instruction: str | None = None


class Output(Protocol):
    path: Path
    info: RunInfo
    #: Rows in the output: those found at open, then every row written (buffered or on disk).
    rows: int

    def done_ids(self) -> Iterator[str]:
        """The ids of the rows found at open, in order (read from disk, a block at a time)."""
        ...

    def write(self, ids: Sequence[str], vectors: FloatMatrix, tokens: Sequence[int]) -> None:
        """Append rows (`vectors` [N, D]); a checkpoint follows once `checkpoint_rows` are buffered."""
        ...

    def checkpoint(self) -> None:
        """Make every row written so far durable (fsync), so that a kill after it loses none."""
        ...

    def finish(self) -> None:
        """The last checkpoint, then the output in its final form."""
        ...


class OutputKind(Protocol):
    @staticmethod
    def existing(path: Path) -> list[Path]:
        """The files an output at `path` has on disk (finished or not)."""
        ...

    @staticmethod
    def open(path: Path, info: RunInfo, checkpoint_rows: int, *, resume: bool) -> Output: ...


def default_checkpoint_rows(dimensions: int) -> int:
    return max(64, CHECKPOINT_BYTES // (4 * dimensions))


def open_output(
    path: Path,
    fmt: OutputFormat,
    info: RunInfo,
    *,
    resume: bool,
    overwrite: bool,
    checkpoint_rows: int | None = None,
) -> Output:
    """The output at `path`: new; or, where one is already there, resumed (its complete rows kept, a
    torn end cut off) or replaced; else refused, so that no run overwrites another's work by accident."""
    from embedserve.corpus.jsonl_output import JsonlOutput
    from embedserve.corpus.npy_output import NpyOutput
    from embedserve.corpus.parquet_output import ParquetOutput

    kinds: dict[str, OutputKind] = {"parquet": ParquetOutput, "jsonl": JsonlOutput, "npy": NpyOutput}
    kind = kinds[fmt]
    found = kind.existing(path)
    if found and overwrite:
        for existing in found:
            remove(existing)
    elif found and not resume:
        names = " and ".join(str(p) for p in found)
        raise ConfigError(f"output {names} exists: --resume continues it, --overwrite replaces it")
    if not path.parent.is_dir():
        raise ConfigError(f"no folder {str(path.parent)!r} for the output")
    rows = checkpoint_rows or default_checkpoint_rows(info.dimensions)
    return kind.open(path, info, rows, resume=bool(found) and not overwrite)


def skip_done(rows: Iterator[Row], output: Output, source: Source) -> Iterator[Row]:
    """The input's rows after those already in `output`, which must be its first rows, id for id (the
    output is written in input order): anything else means another input, refused rather than mixed."""
    for count, done in enumerate(output.done_ids(), 1):
        row = next(rows, None)
        if row is None:
            raise ConfigError(
                f"cannot resume: {output.path.name} holds {output.rows} rows, the input only {count - 1} "
                "(--overwrite starts again)"
            )
        if row.id != done:
            raise ConfigError(
                f"cannot resume: row {count} of {output.path.name} has id {done!r}, but "
                f"{source.where(row.number)} has id {row.id!r}: the output was not made from this input "
                "(--overwrite starts again)"
            )
    return rows


def check_width(path: Path, found: int, info: RunInfo) -> None:
    if found != info.dimensions:
        raise ConfigError(
            f"cannot resume: {path.name} holds {found}-dimensional vectors, this run makes "
            f"{info.dimensions} (the same --model and --dimensions as the run that started it)"
        )


# ---- durable files --------------------------------------------------------------------------------


def sync_file(fh: IO[Any]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def replace_durably(tmp: Path, final: Path) -> None:
    """`tmp` (already synced) becomes `final` atomically: a kill leaves one or the other, never half."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def remove(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
