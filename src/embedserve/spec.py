"""ModelSpec, the resolved description of one served model, and its Dense layers. A leaf (no files, no
frameworks, nothing of the catalog), so that backends and the wire layer import it alone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from embedserve.prompts import input_types
from embedserve.types import (
    BackendName,
    DeviceName,
    DtypeName,
    OutputName,
    PaddingSide,
    Pooling,
    Quantize,
    TiktokenName,
)

FamilyName = Literal["bge-m3", "qwen3-embedding"]


@dataclass(frozen=True, slots=True)
class DenseLayer:
    """A sentence-transformers Dense module: y = activation(x @ W.T + b)."""

    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # "identity" | "tanh"


@dataclass(frozen=True, slots=True)
class M3Heads:
    """bge-m3's heads beside its weights (FlagEmbedding's BGEM3FlagModel): `sparse_linear.pt`, a
    Linear(hidden -> 1) whose relu is each token's lexical weight, and `colbert_linear.pt`, a
    Linear(hidden -> colbert_dim) whose output is each token's ColBERT vector."""

    sparse_linear: Path
    colbert_linear: Path
    hidden_size: int  # both heads' input: the encoder's width
    colbert_dim: int


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
    #: bge-m3's sparse and ColBERT heads, where the folder has them.
    heads: M3Heads | None = None
    backend: BackendName = "auto"
    dtype: DtypeName = "auto"
    device: DeviceName = "auto"
    quantize: Quantize | None = None
    price_per_million_input_tokens: float = 0.0
    batch_price_per_million_input_tokens: float | None = None  # None: half the online price

    @property
    def batch_price(self) -> float:
        """What a batch line is billed per million input tokens."""
        if self.batch_price_per_million_input_tokens is None:
            return self.price_per_million_input_tokens / 2
        return self.batch_price_per_million_input_tokens

    tiktoken_ids: TiktokenName | None = None  # token ids not the model's own are read as this encoding's
    owned_by: str = "embedserve"
    created: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    @property
    def splade(self) -> bool:
        """A SPLADE sparse encoder (a masked LM pooled over its logits): its pooled vector is its
        vocabulary's weights, served as a sparse vector only."""
        return self.pooling == "splade"

    @property
    def outputs(self) -> tuple[OutputName, ...]:
        """What the model computes, in the order of OUTPUT_NAMES."""
        if self.splade:
            return ("sparse",)
        if self.heads is not None:
            return ("dense", "sparse", "colbert")
        return ("dense",)

    @property
    def input_types(self) -> list[str]:
        return input_types(self.prompts)
