"""Which reader and which output a path gets: by its extension, unless --input-format / --output-format
says (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from embedserve.errors import ConfigError

InputFormat = Literal["jsonl", "csv", "parquet", "text"]
OutputFormat = Literal["parquet", "jsonl", "npy"]

INPUT_FORMATS: tuple[str, ...] = get_args(InputFormat)
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)

_INPUT_SUFFIXES: dict[str, InputFormat] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_OUTPUT_SUFFIXES: dict[str, OutputFormat] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".npy": "npy",
}


def input_format(path: Path, given: InputFormat | None = None) -> InputFormat:
    """`given`, else by extension; any other extension (.txt, none) is plain text, a line each."""
    if given is not None:
        return given
    return _INPUT_SUFFIXES.get(path.suffix.lower(), "text")


def output_format(path: Path, given: OutputFormat | None = None) -> OutputFormat:
    """`given`, else by extension; an output of unknown kind is refused rather than guessed."""
    if given is not None:
        return given
    found = _OUTPUT_SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise ConfigError(
            f"cannot tell the output format of {str(path)!r} from its extension: name it .parquet, "
            ".jsonl or .npy, or pass --output-format"
        )
    return found
