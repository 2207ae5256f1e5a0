"""embedserve.Engine: the model pipeline as a library, the one the HTTP server runs (resolve, validate,
prompt, tokenize, batch, finish), for scripts, batch jobs and actors. Keys, rate limits, the usage
ledger and the HTTP edge stay outside it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from embedserve.backends.factory import BackendFactory, make_backend
from embedserve.catalog import Catalog, build_catalog, declared_entries
from embedserve.errors import ModelLoadError, ShuttingDown
from embedserve.metrics import Metrics
from embedserve.runtime import ModelRegistry
from embedserve.service import EmbeddingPipeline, Meter
from embedserve.settings import Settings
from embedserve.types import (
    ANONYMOUS,
    ByteMatrix,
    EmbeddingJob,
    EmbeddingResult,
    FloatMatrix,
    OutputDtype,
    OutputName,
    Principal,
    SparseVector,
    WorkClass,
)
from embedserve.validation import parse_embedding_request

log = logging.getLogger("embedserve.engine")

#: What `Engine.embed` takes: one text, texts, one array of token ids, or arrays of them (numpy too).
Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class Embeddings:
    """One call's answer, in the order of its inputs."""

    #: [N, D] float32: final (truncated to `dimensions`, normalized as the model is served).
    vectors: FloatMatrix
    #: [N]: each input's tokens as the model read them (what the server bills).
    token_counts: tuple[int, ...]
    #: The catalog id the model name resolved to (an alias resolves to its model's id).
    model: str
    #: [N, D] int8/uint8 or [N, D / 8] packed bits: `vectors` as `output_dtype` asked (None: float32).
    packed: ByteMatrix | None = None
    #: [N] lexical weights by token id, with "sparse" in `outputs`.
    sparse: tuple[SparseVector, ...] | None = None
    #: [N] x [n_i, C] L2-normalized token vectors, with "colbert" in `outputs`.
    colbert: tuple[FloatMatrix, ...] | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


def catalog_of(settings: Settings) -> Catalog:
    """The models `settings` serve (`models`, `models_file`, `aliases`), located and read."""
    entries = declared_entries(settings.model_args, settings.models_file)
    return build_catalog(entries, allow_download=settings.allow_download, aliases=settings.aliases)


def plain_input(inputs: Inputs) -> Any:
    """Python and numpy sequences -> the JSON shapes the request validation reads (lists of str / int):
    the library's inputs are checked by the very rules the HTTP route's are."""
    if isinstance(inputs, np.ndarray):
        return inputs.tolist()
    if isinstance(inputs, str):
        return inputs
    return [item.tolist() if isinstance(item, np.ndarray) else _plain_item(item) for item in inputs]


def _plain_item(item: Any) -> Any:
    if isinstance(item, np.integer):
        return int(item)
    if isinstance(item, (tuple, list)):
        return [int(v) if isinstance(v, np.integer) else v for v in item]
    return item


class Engine:
    """The models of one `Settings`, loaded and batched: concurrent `embed` calls (from one event loop)
    are batched together exactly as the server's requests are.

        async with Engine.open(["all-MiniLM-L6-v2"]) as engine:
            result = await engine.embed("all-MiniLM-L6-v2", ["a text", "another"])
            result.vectors  # numpy float32 [2, 384]

    `backends` builds each model's backend (backends.factory.make_backend: ONNX Runtime or torch)."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        *,
        backends: BackendFactory = make_backend,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog if catalog is not None else catalog_of(settings)
        self.metrics = metrics if metrics is not None else Metrics()
        self.registry = ModelRegistry(self.catalog, settings, self.metrics, backends=backends)
        self._pipeline = EmbeddingPipeline(self.registry, settings, self.metrics)
        self._loading: asyncio.Task[None] | None = None
        self._closing = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    def open(
        cls,
        models: str | Sequence[str] | None = None,
        *,
        backends: BackendFactory = make_backend,
        **settings: Any,
    ) -> Engine:
        """An engine on `models` (bundled names, folders, hub ids, ID=SOURCE; default: the bundled
        model) and any other setting the server takes (`truncate=True`, `models_file=...`). Settings not
        given come from EMBEDSERVE_* variables, as the server's do."""
        if models is not None:
            settings["models"] = [models] if isinstance(models, str) else list(models)
        return cls(Settings(**settings), backends=backends)

    # ---- lifetime -------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin loading every model in the background (the server answers /health meanwhile)."""
        if self._loading is None:
            self._loading = asyncio.create_task(self.registry.load_all(), name="load-models")

    async def wait_loaded(self) -> None:
        """Wait for the models to load; ModelLoadError naming each model that failed."""
        self.start()
        assert self._loading is not None
        await asyncio.shield(self._loading)
        if not self.registry.ready:
            raise ModelLoadError(f"models failed to load: {self.registry.not_ready_reason()}")

    async def __aenter__(self) -> Engine:
        try:
            await self.wait_loaded()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        """Calls being served."""
        return self._in_flight

    async def close(self, grace: float | None = None) -> None:
        """Refuse new calls (ShuttingDown), let those in flight finish (up to `grace` seconds; None:
        however long they take), then stop the batchers and free the models. Idempotent."""
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("engine closing with %d call(s) still in flight", self._in_flight)
        if self._loading is not None:
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        await self.registry.close()

    # ---- embedding ------------------------------------------------------------------------------

    async def embed(
        self,
        model: str,
        inputs: Inputs,
        *,
        dimensions: int | None = None,
        input_type: str | None = None,
        instruction: str | None = None,
        outputs: Sequence[OutputName] = ("dense",),
        output_dtype: OutputDtype = "float32",
        work: WorkClass = "online",
    ) -> Embeddings:
        """Embed `inputs` with `model` (an id or alias). `dimensions`: Matryoshka truncation where the
        model has it; `input_type` ("query", "document" or a prompt name) and `instruction` (a query's
        task) choose the prompt as the HTTP API's fields do; `outputs` ("dense", "sparse", "colbert":
        what the model's card lists) and `output_dtype` as the API's extensions. `work="batch"`:
        background work, embedded only when no online input waits (a corpus job beside a server's
        traffic). Raises the server's typed errors (embedserve.errors: InvalidRequest and its kinds,
        ModelNotFound, ServiceUnavailable, ...)."""
        payload = {
            "model": model,
            "input": plain_input(inputs),
            "dimensions": dimensions,
            "input_type": input_type,
            "instruction": instruction,
            "outputs": list(outputs),
            "output_dtype": output_dtype,
        }
        job = parse_embedding_request(payload, max_inputs=self.settings.max_inputs_per_request)
        if not self.registry.ready and not self._closing:  # (the server's routes answer 503 instead)
            await self.wait_loaded()  # an engine used without `async with` loads on its first call
        result = await self.run(job, work=work)
        return Embeddings(
            vectors=result.vectors,
            token_counts=result.token_counts,
            model=result.model_id,
            packed=result.packed,
            sparse=result.sparse,
            colbert=result.colbert,
        )

    async def run(
        self,
        job: EmbeddingJob,
        principal: Principal = ANONYMOUS,
        meter: Meter | None = None,
        *,
        work: WorkClass = "online",
    ) -> EmbeddingResult:
        """The pipeline on a validated job, for `principal` (the models its key may use) within
        `meter` (its key's token limit), as work of class `work` ("batch": a batch job's line, in the
        model's idle time): what the HTTP route and the batch worker call."""
        if self._closing:
            raise ShuttingDown("The engine is closed; it takes no new work.", retry_after_s=5)
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._pipeline.run(job, principal, meter, work=work)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
