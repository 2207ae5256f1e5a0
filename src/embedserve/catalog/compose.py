"""One model's ModelSpec from what its folder says, its family's preset and the operator's entry (in
rising order of precedence), with the checks that span them (limits, sizes, prompts, instruction)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embedserve.catalog.entries import ModelEntry
from embedserve.catalog.families import Family, architecture_matches, detect_family, query_instruction_of
from embedserve.catalog.layout import Layout, read_layout
from embedserve.catalog.locate import owner
from embedserve.errors import ConfigError, ModelLoadError
from embedserve.prompts import INSTRUCTION_SLOT
from embedserve.spec import M3Heads, ModelSpec
from embedserve.types import Pooling

log = logging.getLogger("embedserve.catalog")


def read_spec(entry: ModelEntry, folder: Path) -> ModelSpec:
    """Combine the folder's own configuration, the family preset and the entry's overrides. `entry` is
    located (it has its id)."""
    assert entry.id is not None
    layout = read_layout(folder)
    family = _family_of(entry, layout.config)
    pooling, normalize, max_tokens = layout.pooling, layout.normalize, layout.max_seq_length
    if not layout.sentence_transformers and entry.pooling is None and family is None:
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
    pooling = entry.pooling or pooling
    if pooling is None:
        raise ModelLoadError(f"model '{entry.id}': modules.json has no Pooling module")
    if pooling == "splade":
        _check_splade(entry, layout, folder)
        normalize = False
    dimensions = _dimensions(entry, layout, folder, pooling)
    matryoshka = entry.matryoshka_dimensions or (family.matryoshka_dimensions(dimensions) if family else ())
    if any(d > dimensions for d in matryoshka):
        raise ConfigError(
            f"model '{entry.id}': matryoshka_dimensions {list(matryoshka)} exceed the "
            f"model's {dimensions} dimensions"
        )
    prompts = dict(entry.prompts) if entry.prompts is not None else dict(layout.prompts)
    default_prompt_name = entry.default_prompt_name or layout.default_prompt_name
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ConfigError(
            f"model '{entry.id}': default_prompt_name {default_prompt_name!r} is not one "
            f"of its prompts {sorted(prompts)}"
        )
    query_template, default_instruction = _query_prompt(entry, family, prompts)
    return ModelSpec(
        id=entry.id,
        aliases=entry.aliases,
        source=entry.source,
        folder=folder,
        pooling=pooling,
        normalize=normalize if entry.normalize is None else entry.normalize,
        max_input_tokens=_max_input_tokens(entry, layout, max_tokens),
        dimensions=dimensions,
        matryoshka_dimensions=matryoshka,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        query_template=query_template,
        default_instruction=default_instruction,
        family=family.name if family else None,
        eos_token=family.eos_token if family else None,
        padding_side=family.padding_side if family else layout.padding_side,
        lower_case=layout.lower_case,
        dense=layout.dense,
        heads=None if pooling == "splade" else _m3_heads(folder, layout),
        backend=entry.backend,
        dtype=entry.dtype,
        device=entry.device,
        quantize=entry.quantize,
        price_per_million_input_tokens=entry.price_per_million_input_tokens,
        batch_price_per_million_input_tokens=entry.batch_price_per_mtok,
        tiktoken_ids=entry.tiktoken_ids,
        owned_by=owner(entry.source),
        created=int(time.time()),
    )


#: bge-m3's heads, saved beside its weights (config.json names neither, so generic loaders skip them).
SPARSE_HEAD, COLBERT_HEAD = "sparse_linear.pt", "colbert_linear.pt"


def _m3_heads(folder: Path, layout: Layout) -> M3Heads | None:
    """The folder's sparse and ColBERT heads, where it has both (FlagEmbedding loads them only then).
    The ColBERT head keeps the encoder's width, as BGEM3FlagModel's default `colbert_dim` does; the
    backend checks the saved shapes when it loads them."""
    if not ((folder / SPARSE_HEAD).is_file() and (folder / COLBERT_HEAD).is_file()):
        return None
    hidden = layout.config.get("hidden_size")
    if not isinstance(hidden, int):
        raise ModelLoadError(f"{folder / 'config.json'} has no hidden_size for the heads in {folder}")
    return M3Heads(
        sparse_linear=folder / SPARSE_HEAD,
        colbert_linear=folder / COLBERT_HEAD,
        hidden_size=hidden,
        colbert_dim=hidden,
    )


def _masked_lm(layout: Layout) -> bool:
    """config.json names a masked-LM architecture (BertForMaskedLM, DistilBertForMaskedLM, ...)."""
    architectures = layout.config.get("architectures") or ()
    return any(str(name).endswith("ForMaskedLM") for name in architectures)


def _check_splade(entry: ModelEntry, layout: Layout, folder: Path) -> None:
    """SPLADE pools a masked LM's logits into one weight per vocabulary id: the folder must hold that
    head (another architecture's weights would load a randomly initialised one), and the vector is
    served as the model computes it, whole and unnormalized."""
    if not _masked_lm(layout):
        raise ModelLoadError(
            f"model '{entry.id}': pooling 'splade' needs a masked language model, but "
            f"{folder / 'config.json'} names the architectures {layout.config.get('architectures')!r} "
            "(none ends in ForMaskedLM)"
        )
    if not isinstance(layout.config.get("vocab_size"), int):
        raise ModelLoadError(f"model '{entry.id}': {folder / 'config.json'} has no vocab_size")
    if layout.dense or layout.normalize:
        raise ModelLoadError(
            f"model '{entry.id}': {folder / 'modules.json'}: a Dense or Normalize module after "
            "SpladePooling is not supported"
        )
    for key in ("normalize", "matryoshka_dimensions"):
        if getattr(entry, key):
            raise ConfigError(
                f"model '{entry.id}': {key} does not apply to pooling 'splade' (a sparse vector over "
                "the vocabulary, served whole and unnormalized)"
            )


def _family_of(entry: ModelEntry, config: Mapping[str, Any]) -> Family | None:
    family = detect_family((entry.id or entry.source, entry.source, *entry.aliases), entry.family)
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


def _max_input_tokens(entry: ModelEntry, layout: Layout, max_tokens: int | None) -> int:
    """The entry's limit (within the position table), else the smallest the files and preset state."""
    if entry.max_input_tokens is not None:
        if layout.positions is not None and entry.max_input_tokens > layout.positions:
            raise ConfigError(
                f"model '{entry.id}': max_input_tokens {entry.max_input_tokens} is more "
                f"than its {layout.positions} position embeddings allow"
            )
        return entry.max_input_tokens
    limits = [
        x
        for x in (max_tokens, layout.positions, layout.model_max_length)
        if x is not None and 0 < x < 1_000_000
    ]
    if not limits:
        raise ModelLoadError(
            f"model '{entry.id}': cannot tell its maximum input length; set "
            "max_input_tokens in the models file"
        )
    return min(limits)


def _dimensions(entry: ModelEntry, layout: Layout, folder: Path, pooling: Pooling) -> int:
    if pooling == "splade":  # one weight per vocabulary id
        vocab: int = layout.config["vocab_size"]
        return vocab
    if layout.dense:
        return layout.dense[-1].out_features
    hidden = layout.config.get("hidden_size")
    if not isinstance(hidden, int):
        raise ModelLoadError(f"model '{entry.id}': {folder / 'config.json'} has no hidden_size")
    return hidden


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
