"""One record of a corpus as every reader yields it, where it came from, and the checks of its fields
(pure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedserve.errors import InvalidRequest

#: The field (JSONL), column (CSV, Parquet) that holds a record's id unless --id-field names another.
DEFAULT_ID_FIELD = "id"
DEFAULT_TEXT_FIELD = "text"


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    text: str
    #: The line (JSONL, CSV, text) or row (Parquet) it came from, counted from 1.
    number: int


@dataclass(frozen=True, slots=True)
class Source:
    """An input file as error messages name its records: `docs.jsonl line 7`, `docs.parquet row 7`."""

    path: Path
    unit: str  # "line" or "row"

    def where(self, number: int) -> str:
        return f"{self.path.name} {self.unit} {number}"


@dataclass(frozen=True, slots=True)
class Fields:
    """Which field holds the text and which the id. `id` None: the "id" field where the input has one
    (the first record, a CSV header, a Parquet schema decides), else each record's number."""

    text: str = DEFAULT_TEXT_FIELD
    id: str | None = None


def json_type(value: Any) -> str:
    """Pure: a JSON value's kind, as a message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def text_of(value: Any, field: str, where: str) -> str:
    """A record's text: a string (an empty one is the engine's to refuse, with the API's reason)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}: {field!r} is {json_type(value)}, not a string", param=field)
    return value


def id_of(value: Any, field: str, where: str) -> str:
    """A record's id: a non-empty string, or an integer (written as its decimal string)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InvalidRequest(
            f"{where}: {field!r} is {json_type(value)}; an id is a string or an integer", param=field
        )
    if not value:
        raise InvalidRequest(f"{where}: {field!r} is an empty string; an id must not be empty", param=field)
    return value
