"""What the operator declared: `--model` arguments and models-file entries, as ModelEntry (a pydantic
model that refuses unknown keys and wrong types), and the one-line ConfigError a bad entry becomes."""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic_core import ErrorDetails

from embedserve.errors import ConfigError
from embedserve.prompts import INSTRUCTION_SLOT
from embedserve.spec import FamilyName
from embedserve.types import BackendName, DeviceName, DtypeName, Pooling, Quantize, TiktokenName

# TOML has no null, so `None` below only ever means "not given". Strict scalars: TOML `true` must not
# pass as the integer 1, nor 64.0 or "64" as a dimension. A description says what a field takes, for
# the error message (`describe_errors`).
_Text = Annotated[StrictStr, Field(pattern=r"\S")]
_OptionalText = Annotated[_Text | None, Field(description="a non-empty string")]
_Positive = Annotated[StrictInt, Field(gt=0)]


def _sorted_unique(dims: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if dims is None else tuple(sorted(set(dims)))


def _has_instruction_slot(template: str | None) -> str | None:
    if template is not None and INSTRUCTION_SLOT not in template:
        raise ValueError(f"must contain {INSTRUCTION_SLOT}")
    return template


class ModelEntry(BaseModel):
    """A model as the operator declared it. Every optional field overrides what the files say."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Annotated[_Text, Field(description="a bundled model, a folder or a hub repo id such as org/name")]
    id: _OptionalText = None
    aliases: Annotated[tuple[_Text, ...], Field(description="a list of non-empty strings")] = ()
    pooling: Pooling | None = None
    normalize: Annotated[StrictBool | None, Field(description="true or false")] = None
    max_input_tokens: Annotated[_Positive | None, Field(description="a positive integer")] = None
    matryoshka_dimensions: Annotated[
        tuple[_Positive, ...] | None,
        Field(description="a list of positive integers"),
        AfterValidator(_sorted_unique),
    ] = None
    prompts: Annotated[
        dict[StrictStr, StrictStr] | None, Field(description="a table of strings (name = prompt)")
    ] = None
    default_prompt_name: _OptionalText = None
    family: Literal["auto", "none", FamilyName] = "auto"
    instruction: _OptionalText = None  # the default task of queries, for models with a query template
    # e.g. "Instruct: {instruction}\nQuery: "
    query_template: Annotated[_OptionalText, AfterValidator(_has_instruction_slot)] = None
    backend: BackendName = "auto"
    dtype: DtypeName = "auto"
    device: DeviceName = "auto"
    quantize: Quantize | None = None  # None: the server's --quantize
    sha256: _OptionalText = None
    # What the usage reports charge; output tokens are free.
    price_per_million_input_tokens: Annotated[
        float, Field(strict=True, ge=0, allow_inf_nan=False, description="a number >= 0")
    ] = 0.0
    # A batch line's price (the Batch API's discount); None: half the online price.
    batch_price_per_mtok: Annotated[
        float | None, Field(strict=True, ge=0, allow_inf_nan=False, description="a number >= 0")
    ] = None
    tiktoken_ids: TiktokenName | None = None  # None: the server's --tiktoken-ids


def parse_model_arg(arg: str) -> ModelEntry:
    """`--model` takes `SOURCE` or `ID=SOURCE`; SOURCE is a bundled model, a folder or a hub repo id."""
    arg = arg.strip()
    if not arg:
        raise ConfigError("--model needs a value")
    name, sep, source = arg.partition("=")
    if sep:
        if not name or not source:
            raise ConfigError(f"--model {arg!r}: expected ID=SOURCE")
        return ModelEntry(source=source, id=name)
    return ModelEntry(source=arg)


def load_models_file(path: Path) -> list[ModelEntry]:
    """Read a TOML catalog: `[[models]]` tables with the ModelEntry fields. Every problem of every entry
    is reported, on one line."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"models file {path}: {exc}") from exc
    tables = doc.get("models")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"models file {path}: expected one or more [[models]] tables")
    entries: list[ModelEntry] = []
    problems: list[str] = []
    for number, table in enumerate(tables, start=1):
        try:
            entries.append(ModelEntry.model_validate(table))
        except ValidationError as exc:
            problems.append(f"{entry_label(number, table)}: {describe_errors(exc.errors(), table)}")
    if problems:
        raise ConfigError(f"models file {path}, " + "; ".join(problems))
    return entries


def entry_label(number: int, table: object) -> str:
    """Pure: `model #2 ("qwen")`, the entry by its place in the file (from 1) and its id or source."""
    name = None
    if isinstance(table, Mapping):
        name = next((table[k] for k in ("id", "source") if isinstance(table.get(k), str)), None)
    return f"model #{number}" + (f" ({_shown(name)})" if name else "")


def describe_errors(errors: Sequence[ErrorDetails], table: object) -> str:
    """Pure: pydantic's errors on one entry as `field: problem`, joined by '; '. The problem says what the
    field takes (its choices, or its description) and repeats the value as written, cut short."""
    out: list[str] = []
    fields = ModelEntry.model_fields
    for error in errors:
        key = str(error["loc"][0]) if error["loc"] else ""
        if not key:
            out.append(f"must be a table of keys, got {_shown(table)}")
            continue
        if error["type"] == "extra_forbidden":
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"the keys are {', '.join(fields)}"
            out.append(f"{key}: unknown key ({hint})")
            continue
        field = fields[key]
        value = table.get(key) if isinstance(table, Mapping) else None
        choices = _choices(field.annotation)
        if error["type"] == "missing":
            out.append(f"{key}: required ({field.description})")
        elif choices:
            out.append(f"{key}: {_shown(value)} is not one of {', '.join(choices)}")
        elif error["type"] == "value_error":
            out.append(f"{key}: {error['ctx']['error']}")
        else:
            out.append(f"{key}: must be {field.description or error['msg']}, got {_shown(value)}")
    return "; ".join(dict.fromkeys(out))  # one line per field, however many items of a list are wrong


def _choices(annotation: Any) -> list[str]:
    """The values a Literal field takes (`Literal[...] | None` included), else []."""
    if get_origin(annotation) is Literal:
        return [str(v) for v in get_args(annotation)]
    if get_origin(annotation) in (Union, UnionType):
        return [c for arg in get_args(annotation) for c in _choices(arg)]
    return []


def _shown(value: object, limit: int = 60) -> str:
    """A value as the TOML file wrote it (JSON is close: "text", true, [1, 2]), cut to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
