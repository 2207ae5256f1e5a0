"""What a model folder says about itself: config.json, the sentence-transformers modules (Transformer,
Pooling, Dense, Normalize; a SparseEncoder's MLMTransformer and SpladePooling), its prompts and the
tokenizer's limits. Reads files; knows no entry."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

from embedserve.errors import ModelLoadError
from embedserve.spec import DenseLayer
from embedserve.types import PaddingSide, Pooling

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
#: What SpladePooling we serve (backends/pooling.splade_pool): the max over tokens of log(1 + relu(x)),
#: as SPLADE v2 and later compute it; the original SPLADE's sum and OpenSearch's log1p_relu are not.
SPLADE_POOLING = {"pooling_strategy": "max", "activation_function": "relu"}


@dataclass(frozen=True, slots=True)
class Layout:
    """A folder's own configuration; every field is what its files say, nothing is defaulted from
    elsewhere."""

    config: Mapping[str, Any]  # config.json
    sentence_transformers: bool  # it has a modules.json
    pooling: Pooling | None = None
    normalize: bool = False  # a Normalize module
    dense: tuple[DenseLayer, ...] = ()
    max_seq_length: int | None = None  # sentence_bert_config.json
    lower_case: bool = False
    prompts: Mapping[str, str] = field(default_factory=dict)  # config_sentence_transformers.json
    default_prompt_name: str | None = None
    model_max_length: int | None = None  # tokenizer_config.json
    padding_side: PaddingSide = "right"
    positions: int | None = None  # the position embeddings' limit on tokens, from config.json


def read_layout(folder: Path) -> Layout:
    """Read every configuration file the folder has. Raises ModelLoadError naming the file at fault."""
    config = read_json(folder / "config.json")
    modules_path = folder / "modules.json"
    pooling: Pooling | None = None
    normalize = False
    dense: list[DenseLayer] = []
    max_seq_length: int | None = None
    lower_case = False
    if modules_path.is_file():
        for module in _read_modules(modules_path):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            sub = folder / str(module.get("path", ""))
            # sentence-transformers 5 saves a SparseEncoder's transformer as MLMTransformer, 6 as a
            # Transformer whose task is fill-mask: both are read alike (the head is config.json's).
            if kind in ("Transformer", "MLMTransformer"):
                st_cfg = sub / "sentence_bert_config.json"
                if st_cfg.is_file():
                    bert_cfg = read_json(st_cfg)
                    max_seq_length = _int_or_none(bert_cfg.get("max_seq_length")) or max_seq_length
                    lower_case = bool(bert_cfg.get("do_lower_case", False))
            elif kind == "Pooling":
                pooling = _pooling_from_config(sub / "config.json")
            elif kind == "SpladePooling":
                pooling = _splade_from_config(sub / "config.json")
            elif kind == "Dense":
                dense.append(_dense_from_folder(sub))
            elif kind == "Normalize":
                normalize = True
            else:
                raise ModelLoadError(
                    f"{modules_path}: sentence-transformers module {kind!r} is not supported"
                )
    st_config_path = folder / "config_sentence_transformers.json"
    st_config = read_json(st_config_path) if st_config_path.is_file() else {}
    prompts = st_config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelLoadError(f"{st_config_path}: 'prompts' must map names to strings")
    default_prompt_name = st_config.get("default_prompt_name")
    if default_prompt_name is not None and not isinstance(default_prompt_name, str):
        raise ModelLoadError(f"{st_config_path}: 'default_prompt_name' must be a string")
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    return Layout(
        config=config,
        sentence_transformers=modules_path.is_file(),
        pooling=pooling,
        normalize=normalize,
        dense=tuple(dense),
        max_seq_length=max_seq_length,
        lower_case=lower_case,
        prompts={str(k): v for k, v in prompts.items()},
        default_prompt_name=default_prompt_name,
        model_max_length=_int_or_none(tok_cfg.get("model_max_length")),
        padding_side="left" if tok_cfg.get("padding_side") == "left" else "right",
        positions=_positions_limit(config),
    )


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def read_json(path: Path) -> dict[str, Any]:
    value = _load_json(path)
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return value


def _read_modules(path: Path) -> list[dict[str, Any]]:
    value = _load_json(path)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ModelLoadError(f"{path}: expected a JSON array of module objects")
    return value


def _pooling_from_config(path: Path) -> Pooling:
    cfg = read_json(path)
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


def _splade_from_config(path: Path) -> Pooling:
    """SpladePooling's config (its defaults where a key is missing, as sentence-transformers reads it);
    a strategy or activation other than max / relu is refused rather than served differently."""
    cfg = read_json(path) if path.is_file() else {}
    for key, served in SPLADE_POOLING.items():
        if cfg.get(key, served) != served:
            raise ModelLoadError(
                f"{path}: SpladePooling {key} {cfg[key]!r} is not supported (only {served!r} is)"
            )
    return "splade"


def _dense_from_folder(folder: Path) -> DenseLayer:
    cfg = read_json(folder / "config.json")
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
