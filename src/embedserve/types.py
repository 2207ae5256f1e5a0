"""Internal, frozen value types that travel below service.py (the wire shapes live in protocol.py)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

#: How token states become one vector; "splade": max over tokens of log(1 + relu(MLM logits)).
Pooling = Literal["cls", "mean", "last_token", "splade"]
BackendName = Literal["auto", "torch", "onnx"]
Quantize = Literal["none", "int8"]
DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "float16", "bfloat16"]
PaddingSide = Literal["left", "right"]
EncodingFormat = Literal["float", "base64"]
#: tiktoken encodings whose token ids a model may accept (tiktoken_ids).
TiktokenName = Literal["cl100k_base", "o200k_base"]
ModelStatus = Literal["loading", "ready", "failed"]
#: Who waits for an input: a client of the online API, or a batch job that fills idle capacity.
WorkClass = Literal["online", "batch"]
#: What a model computes for an input (extension `outputs`): the pooled vector, lexical weights per
#: token id, and one vector per token (ColBERT).
OutputName = Literal["dense", "sparse", "colbert"]
OUTPUT_NAMES: tuple[OutputName, ...] = ("dense", "sparse", "colbert")
#: How the dense vector goes on the wire (extension `output_dtype`, sentence-transformers' names).
OutputDtype = Literal["float32", "int8", "uint8", "binary", "ubinary"]
OUTPUT_DTYPES: tuple[OutputDtype, ...] = ("float32", "int8", "uint8", "binary", "ubinary")
FloatMatrix = npt.NDArray[np.float32]
#: int8 or uint8 vectors, one row each (output_dtype other than float32).
ByteMatrix = npt.NDArray[np.int8] | npt.NDArray[np.uint8]
#: One ONNX session input: tensor name -> array (input_ids, attention_mask).
Feeds = Mapping[str, np.ndarray]
IntMatrix = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling and what auth decided about them: the key's id (never the key itself), its name and
    non-secret prefix, the models it may use (None: all), its per-minute limits (None: unlimited) and
    whether it may call the management and usage routes."""

    key_id: str
    name: str | None = None
    prefix: str | None = None
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    admin: bool = False

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def may_use(self, names: tuple[str, ...]) -> bool:
        """A model-limited key may use a model when one of its names (id or alias) is on the key."""
        return self.models is None or not self.models.isdisjoint(names)


ANONYMOUS = Principal(key_id="anonymous")


@dataclass(frozen=True, slots=True)
class Caller:
    """One request's caller, as the service needs it: who, the request id, and when it started
    (time.perf_counter(), as the request middleware notes it, for the usage record's latency)."""

    principal: Principal
    request_id: str
    started: float


def new_record_id() -> str:
    """32 hex digits: the time in nanoseconds, then 64 random bits. Unique without coordination between
    replicas, and in time order, so that the ledger's unique index grows at its end as the table does
    (random ids cut SQLite's write rate by a quarter to a half once the table is large; design note 35)."""
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One successful /v1/embeddings request or batch line, as the ledger keeps it (keyed by key id, never
    the key)."""

    key_id: str
    model: str  # the served id (aliases are resolved)
    prompt_tokens: int
    inputs: int
    request_id: str
    created_at: float  # unix seconds
    latency_ms: float
    price_per_million: float  # the model's price per million input tokens at the time
    #: Made here, unique: what makes a retried or replayed write count once (clients reuse request ids).
    record_id: str = field(default_factory=new_record_id)
    #: The batch whose line this was (None: an online request). A batch line's record id is derived from
    #: the batch and the line, so that a line run again after a crash is billed once.
    batch_id: str | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingJob:
    """A request that passed shape validation: what to embed and how to return it."""

    model: str
    texts: tuple[str, ...] | None
    token_ids: tuple[tuple[int, ...], ...] | None
    encoding_format: EncodingFormat
    dimensions: int | None
    user: str | None
    input_type: str | None = None  # extension: "query" | "document" | a prompt name of the model
    instruction: str | None = None  # extension: the task of a query
    outputs: tuple[OutputName, ...] = ("dense",)  # extension: what to compute, in the order asked
    output_dtype: OutputDtype = "float32"  # extension: the dense vector's wire type
    truncate: bool | None = None  # cut over-long inputs (None: as the server's --truncate says)

    @property
    def count(self) -> int:
        items = self.texts if self.texts is not None else self.token_ids
        assert items is not None
        return len(items)


@dataclass(slots=True, eq=False)
class WorkItem:
    """One input of one request, waiting to be embedded. `seq` orders arrival (oldest first)."""

    ids: list[int]
    seq: int
    future: asyncio.Future[RowOutputs] = field(repr=False)
    queued_at: float = 0.0  # time.perf_counter() when it joined the queue
    request: int | None = None  # the `seq` of its request's first input (None: a request of its own)
    work: WorkClass = "online"  # who waits for it: online inputs are always packed first
    tokens: bool = False  # its caller wants per-token outputs (sparse weights, ColBERT vectors)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def caller(self) -> int:
        """Which request it belongs to: inputs with the same value share one caller's answer."""
        return self.seq if self.request is None else self.request


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """Padded inputs ready for a forward pass."""

    input_ids: IntMatrix  # [B, T]
    attention_mask: IntMatrix  # [B, T], 1 for real tokens
    real_tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        b, t = self.input_ids.shape
        return int(b), int(t)


@dataclass(frozen=True, slots=True)
class PassOutputs:
    """What one forward pass computes for a padded [B, T] batch. `dense` is the pooled vector (after
    any Dense head, before normalization; a SPLADE model's is its [B, V] vocabulary weights). The
    per-token outputs are computed where the model has the heads and the pass was asked for them."""

    dense: FloatMatrix  # [B, D]
    token_weights: FloatMatrix | None = None  # [B, T]: relu(sparse_linear(hidden)), bge-m3's
    token_vectors: npt.NDArray[np.float32] | None = None  # [B, T, C]: colbert_linear(hidden), not normalized


@dataclass(frozen=True, slots=True)
class RowOutputs:
    """One input's share of a pass: its row, and its per-token outputs over its real tokens only (in
    the order of its ids, whichever side the batch was padded on)."""

    dense: npt.NDArray[np.float32]  # [D]
    token_weights: npt.NDArray[np.float32] | None = None  # [n]
    token_vectors: FloatMatrix | None = None  # [n, C]


@dataclass(frozen=True, slots=True)
class SparseVector:
    """Weights by token id: ids ascending and unique, every value > 0."""

    indices: npt.NDArray[np.int64]  # [K]
    values: npt.NDArray[np.float32]  # [K]


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """What the pipeline hands back (to the route, or to the engine's caller)."""

    vectors: FloatMatrix  # [N, D] float32, final (truncated and normalized)
    encoding_format: EncodingFormat
    token_counts: tuple[int, ...]  # [N]: each input's tokens, as billed
    model_id: str  # the catalog id the request's model name resolved to
    outputs: tuple[OutputName, ...] = ("dense",)
    output_dtype: OutputDtype = "float32"
    #: [N, D] int8/uint8 (int8, uint8) or [N, D / 8] (binary, ubinary): `vectors` as output_dtype asks.
    packed: ByteMatrix | None = None
    sparse: tuple[SparseVector, ...] | None = None  # [N], with "sparse" in outputs
    colbert: tuple[FloatMatrix, ...] | None = None  # [N] x [n_i, C], L2-normalized, with "colbert"

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)
