"""The served set: the models declared (`--model`, models file), located and read into ModelSpecs, with
their `--alias` names; `Catalog.resolve(name)` maps an id or alias to its spec."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from embedserve.catalog.compose import read_spec
from embedserve.catalog.entries import ModelEntry, load_models_file, parse_model_arg
from embedserve.catalog.locate import locate
from embedserve.errors import ConfigError, ModelNotFound
from embedserve.spec import ModelSpec
from embedserve.types import ANONYMOUS, Principal


def declared_entries(model_args: Iterable[str], models_file: Path | None) -> list[ModelEntry]:
    """The `--model` arguments, then the models file's entries, in that order."""
    entries = [parse_model_arg(arg) for arg in model_args]
    if models_file is not None:
        entries.extend(load_models_file(models_file))
    return entries


#: How much of an unknown model name an error message repeats (the name is the client's, of any size).
ECHO_CHARS = 64


def echo_name(name: str) -> str:
    """Pure: `name` as an error message may repeat it, at most ECHO_CHARS characters and an ellipsis."""
    return name if len(name) <= ECHO_CHARS else name[:ECHO_CHARS] + "..."


class Catalog:
    """The immutable set of served models, addressable by id or alias."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self._by_name: dict[str, ModelSpec] = {}
        for spec in specs:
            for name in spec.names:
                if name in self._by_name:
                    raise ConfigError(
                        f"model name {name!r} is declared twice ({self._by_name[name].id} and {spec.id})"
                    )
                self._by_name[name] = spec
            self._specs[spec.id] = spec

    def resolve(self, name: str, principal: Principal = ANONYMOUS) -> ModelSpec:
        """An id or alias -> its spec. A model the caller's key may not use is as unknown as a model
        that does not exist (same 404, same message: it lists only the ids the key may use)."""
        spec = self._by_name.get(name)
        if spec is None or not principal.may_use(spec.names):
            usable = [s.id for s in self.specs_for(principal)]
            offer = (
                f" Models you may use: {', '.join(usable)}."
                if usable
                else " Your key may use none of the models served here."
            )
            raise ModelNotFound(
                f"The model '{echo_name(name)}' does not exist or you do not have access to it.{offer}",
                param="model",
            )
        return spec

    def canonical_id(self, name: str) -> str | None:
        """The catalog id `name` stands for, or None: a bounded label for logs and metrics."""
        spec = self._by_name.get(name)
        return None if spec is None else spec.id

    @property
    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def specs_for(self, principal: Principal) -> list[ModelSpec]:
        """The models a caller may use (all, unless its key is limited to some)."""
        return [spec for spec in self._specs.values() if principal.may_use(spec.names)]


def parse_alias(arg: str) -> tuple[str, str]:
    """`--alias NAME=MODEL` -> (NAME, MODEL)."""
    name, sep, model = arg.partition("=")
    if not sep or not name.strip() or not model.strip():
        raise ConfigError(
            f"--alias {arg!r}: expected NAME=MODEL, e.g. text-embedding-3-small=all-MiniLM-L6-v2"
        )
    return name.strip(), model.strip()


def add_aliases(specs: Sequence[ModelSpec], aliases: Iterable[str]) -> list[ModelSpec]:
    """Pure: the specs with each `--alias NAME=MODEL` added to MODEL's names (a served id or alias),
    so that clients with a fixed default model name (`text-embedding-3-small`) reach it. Only a name:
    nothing about the model changes (its family was read from its own names)."""
    out = list(specs)
    for arg in aliases:
        name, model = parse_alias(arg)
        index = next((i for i, spec in enumerate(out) if model in spec.names), None)
        if index is None:
            raise ConfigError(
                f"--alias {arg!r}: no served model is called {model!r} (served: "
                f"{', '.join(spec.id for spec in out)})"
            )
        out[index] = replace(out[index], aliases=(*out[index].aliases, name))
    return out


def build_catalog(
    entries: Iterable[ModelEntry], *, allow_download: bool, aliases: Iterable[str] = ()
) -> Catalog:
    """Locate and read every declared model. Fails fast, before any weights are loaded."""
    specs = []
    for entry in entries:
        located, folder = locate(entry, allow_download=allow_download)
        specs.append(read_spec(located, folder))
    if not specs:
        raise ConfigError("no models to serve")
    return Catalog(add_aliases(specs, aliases))
