"""The flags that set Settings, generated from its fields: name, help (the field's description and its
default), value type and choices, so a flag cannot drift from its setting (design note 45)."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator
from pydantic.fields import FieldInfo

from embedserve.settings import Settings

#: Fields whose flag is not `--field-name`: the repeatable ones are spelled in the singular.
RENAMED = {
    "models": "--model",
    "aliases": "--alias",
    "api_keys": "--api-key",
    "admin_keys": "--admin-key",
}

#: Settings with no flag, set by environment variable only. None today: every setting is a flag.
ENV_ONLY: frozenset[str] = frozenset()

#: The sections of `serve --help`, in order; each field names its own (`json_schema_extra["group"]`).
GROUPS = {
    "models": "models and backends",
    "auth": "API keys",
    "storage": "storage (the key store and the usage ledger)",
    "limits": "request limits",
    "batching": "batching and backpressure",
    "batch": "files and batches (the Batch API)",
    "scale": "scale out (Ray, shared rate limits)",
    "http": "HTTP server",
    "logging": "logging",
}


def flag_name(field: str) -> str:
    return RENAMED.get(field, "--" + field.replace("_", "-"))


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    assert isinstance(extra, dict), "every setting declares its flag with settings._flag"
    return extra


def group_of(field: str) -> str:
    return str(_extra(Settings.model_fields[field])["group"])


def _default_text(info: FieldInfo) -> str:
    """What the default means, in the words `--help` shows: the field's own text where the value alone
    says little (None, an empty list, a computed path), else the value."""
    extra = _extra(info)
    if "default_text" in extra:
        return str(extra["default_text"])
    value = info.get_default(call_default_factory=True)
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.15g}"  # (never an exponent: 2592000, not 2.592e+06)
    return str(value)


def help_text(field: str) -> str:
    """`--help`'s line of a setting: its description, then whether it repeats and its default."""
    info = Settings.model_fields[field]
    assert info.description, f"setting {field} has no description"
    repeatable = "repeatable; " if typing.get_origin(info.annotation) is list else ""
    return f"{info.description} ({repeatable}default: {_default_text(info)})".replace("%", "%%")


def _argument(field: str, info: FieldInfo) -> dict[str, Any]:
    """argparse keywords from the annotation: Literal -> choices, bool -> a switch, list -> repeatable,
    int/float/Path -> converted; a value with its own text form (a size: `8GiB`) goes to Settings as
    given. No default: an absent flag leaves the environment's value or the field's default."""
    kwargs: dict[str, Any] = {"dest": field, "default": argparse.SUPPRESS, "help": help_text(field)}
    if "metavar" in _extra(info):
        kwargs["metavar"] = _extra(info)["metavar"]
    kind: Any = info.annotation
    if any(isinstance(m, BeforeValidator) for m in info.metadata):  # pydantic's place for a bare Annotated
        return kwargs
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: the flag gives an X
        (kind,) = [arm for arm in typing.get_args(kind) if arm is not type(None)]
    if typing.get_origin(kind) is Annotated:
        kind, *metadata = typing.get_args(kind)
        if any(isinstance(m, BeforeValidator) for m in metadata):
            return kwargs
    if kind is bool:
        kwargs.pop("metavar", None)
        return {**kwargs, "action": "store_true"}
    if typing.get_origin(kind) is list:
        return {**kwargs, "action": "append"}
    if typing.get_origin(kind) is Literal:
        return {**kwargs, "choices": list(typing.get_args(kind))}
    if kind in (int, float, Path):
        return {**kwargs, "type": kind}
    assert kind is str, f"setting {field}: no flag type for {kind}"
    return kwargs


def add_setting_flags(parser: argparse._ActionsContainer, fields: Iterable[str]) -> None:
    """One flag per named setting, in the parser (or one of its argument groups)."""
    for field in fields:
        parser.add_argument(flag_name(field), **_argument(field, Settings.model_fields[field]))


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """Every setting but the environment-only ones, grouped into the sections of GROUPS."""
    flagged = [f for f in Settings.model_fields if f not in ENV_ONLY]
    assert {group_of(f) for f in flagged} <= set(GROUPS), "a setting names a section GROUPS lacks"
    for group, title in GROUPS.items():
        add_setting_flags(parser.add_argument_group(title), [f for f in flagged if group_of(f) == group])


def settings_from(args: argparse.Namespace) -> Settings:
    """The parsed flags over EMBEDSERVE_* over the defaults (an absent flag is absent from `args`)."""
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)
