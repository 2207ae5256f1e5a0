"""EmbeddingPipeline.run(): the one place where the order of the pipeline is written, for the server and
the library alike. Everything before tokenizing is cheap, so a request is refused before its work is
done, not after; the caller's allowance (a key's token limit) is a `Meter` it is handed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Protocol, TypeVar

import numpy as np

from embedserve import tiktoken_ids
from embedserve.compact import quantize
from embedserve.errors import EmbedServeError, InvalidInputType, InvalidOutputDtype
from embedserve.metrics import Metrics
from embedserve.postprocess import colbert_vectors, finish, lexical_weights, nonzero_weights
from embedserve.prompts import choose_prefix
from embedserve.runtime import ModelRegistry, ModelRuntime
from embedserve.settings import Settings
from embedserve.spec import ModelSpec
from embedserve.tokenization import Stop, TokenLimits, ensure_last
from embedserve.types import (
    ANONYMOUS,
    EmbeddingJob,
    EmbeddingResult,
    OutputDtype,
    OutputName,
    Principal,
    RowOutputs,
    WorkClass,
)
from embedserve.validation import (
    check_dimensions,
    check_framing,
    check_lengths,
    check_outputs,
    check_token_ids,
)

_Array = TypeVar("_Array", bound=np.ndarray)


class Meter(Protocol):
    """What one request may spend, held across its run (a key's tokens per minute: ratelimit.KeyMeter).
    Async: the allowance may live in another process (a shared rate-limit store)."""

    async def hold(self, estimate: int) -> int | None:
        """Before tokenizing, from an upper bound of the tokens -> stop tokenizing once past this many
        (None: the hold surely covers the request)."""
        ...

    async def settle(self, tokens: int) -> None:
        """Tokenized: the request holds exactly `tokens` (or is refused, the hold given back)."""
        ...

    async def over_limit(self, tokens: int) -> EmbedServeError:
        """Tokenizing stopped at the hold's limit with at least `tokens`: the error to raise."""
        ...

    async def release(self) -> None:
        """Refused or not embedded: give the hold back."""
        ...


class Unmetered:
    """The library's caller: no limit but the engine's own."""

    async def hold(self, estimate: int) -> int | None:
        return None

    async def settle(self, tokens: int) -> None:
        return None

    async def over_limit(self, tokens: int) -> EmbedServeError:  # pragma: no cover - hold never stops one
        raise AssertionError("an unmetered request has no limit to be over")

    async def release(self) -> None:
        return None


def prefix_for(
    spec: ModelSpec,
    *,
    model: str,
    dimensions: int | None,
    input_type: str | None,
    instruction: str | None,
    outputs: tuple[OutputName, ...] = ("dense",),
    output_dtype: OutputDtype = "float32",
) -> str:
    """The request's options checked against the model (`model`: the name the caller used, for the
    messages) -> the prompt put in front of each text. The pipeline's first checks, which the corpus
    command also makes before the model loads."""
    check_outputs(outputs, model=model, available=spec.outputs)
    if output_dtype != "float32" and "dense" not in outputs:
        raise InvalidOutputDtype(
            f"'output_dtype' {output_dtype!r} applies to the dense vector, which 'outputs' does not ask for.",
            param="output_dtype",
        )
    check_dimensions(dimensions, model=model, native=spec.dimensions, allowed=spec.matryoshka_dimensions)
    return choose_prefix(
        model=model,
        prompts=spec.prompts,
        default_prompt_name=spec.default_prompt_name,
        query_template=spec.query_template,
        default_instruction=spec.default_instruction,
        input_type=input_type,
        instruction=instruction,
    )


def _present(array: _Array | None) -> _Array:
    assert array is not None, "a pass asked for per-token outputs returned none"
    return array


class EmbeddingPipeline:
    """resolve for the caller -> check against the model -> choose the prompt -> read token ids as the
    model's own, or as the text of a tiktoken encoding's ids -> hold the estimated tokens -> admit to
    the model's queue -> tokenize, stopping at the first limit broken -> end with EOS where the model
    pools on it -> check lengths -> settle the exact tokens -> batch -> finish."""

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self._registry = registry
        self._settings = settings
        self._metrics = metrics

    async def run(
        self,
        job: EmbeddingJob,
        principal: Principal = ANONYMOUS,
        meter: Meter | None = None,
        *,
        work: WorkClass = "online",
    ) -> EmbeddingResult:
        """`work`: an online request's inputs go before any batch job's, which fill the model's idle
        time and are admitted without the online queue's bounds (scheduler.batcher)."""
        meter = meter or Unmetered()
        spec = self._registry.catalog.resolve(job.model, principal)
        prefix = prefix_for(
            spec,
            model=job.model,
            dimensions=job.dimensions,
            input_type=job.input_type,
            instruction=job.instruction,
            outputs=job.outputs,
            output_dtype=job.output_dtype,
        )
        runtime = self._registry.runtime(spec)
        if job.token_ids is not None:
            job = await self._own_ids(job, runtime)
        if job.texts is not None:
            estimate = runtime.tokenizer.upper_bound(job.texts, prefix, spec.max_input_tokens)
        else:
            if prefix and job.input_type is not None:
                raise InvalidInputType(
                    f"input_type {job.input_type!r} puts {prefix!r} in front of the text on the model "
                    f"'{job.model}', which token ids cannot take: send text, or include the prefix's "
                    "tokens in the ids and leave out input_type.",
                    param="input_type",
                )
            estimate = sum(len(ids) + 1 for ids in job.token_ids or ())
        stop_at = await meter.hold(estimate)
        try:
            with runtime.batcher.admit(job.count, work) as admission:
                sequences = await self._sequences(job, prefix, runtime, stop_at, meter)
                counts = tuple(len(ids) for ids in sequences)
                await meter.settle(sum(counts))
                tokens = spec.heads is not None and ("sparse" in job.outputs or "colbert" in job.outputs)
                rows = await runtime.batcher.encode(sequences, admission, work=work, tokens=tokens)
        except BaseException:  # refused, or not embedded (overload, shutdown, cancelled): not counted
            # Shielded: a second cancellation while the store answers must not lose the give-back.
            await asyncio.shield(meter.release())
            raise
        return self._result(job, runtime, sequences, rows)

    @staticmethod
    def _result(
        job: EmbeddingJob, runtime: ModelRuntime, sequences: list[list[int]], rows: list[RowOutputs]
    ) -> EmbeddingResult:
        """Each input's outputs as `job` asks for them (postprocess, compact: pure)."""
        spec = runtime.spec
        pooled = np.stack([row.dense for row in rows])  # [N, D]
        vectors = finish(pooled, dimensions=job.dimensions, normalize=spec.normalize)
        packed = None
        if "dense" in job.outputs and job.output_dtype != "float32":
            ranges = runtime.ranges.get(job.dimensions or spec.dimensions)
            packed = quantize(vectors, job.output_dtype, ranges)
        sparse = colbert = None
        if "sparse" in job.outputs:
            if spec.splade:
                sparse = tuple(nonzero_weights(row.dense) for row in rows)
            else:
                sparse = tuple(
                    lexical_weights(ids, _present(row.token_weights), runtime.unused_ids)
                    for ids, row in zip(sequences, rows, strict=True)
                )
        if "colbert" in job.outputs:
            colbert = tuple(colbert_vectors(_present(row.token_vectors)) for row in rows)
        return EmbeddingResult(
            vectors=vectors,
            encoding_format=job.encoding_format,
            token_counts=tuple(len(ids) for ids in sequences),
            model_id=spec.id,
            outputs=job.outputs,
            output_dtype=job.output_dtype,
            packed=packed,
            sparse=sparse,
            colbert=colbert,
        )

    @staticmethod
    async def _own_ids(job: EmbeddingJob, runtime: ModelRuntime) -> EmbeddingJob:
        """Token ids as the model will read them: its own (framed as its tokenizer frames every text,
        inside its vocabulary), or, on a model that takes a tiktoken encoding's ids (tiktoken_ids),
        the text that ids not its own stand for, tokenized from here on like any text."""
        arrays = job.token_ids or ()
        framing = runtime.id_framing
        own = framing is not None and all(framing.frames(ids) for ids in arrays)
        if runtime.tiktoken is not None and not own:
            texts = await runtime.tokenizer.in_thread(tiktoken_ids.decode, runtime.tiktoken, arrays)
            return replace(job, texts=tuple(texts), token_ids=None)
        if framing is not None:
            check_framing(
                arrays,
                head=framing.head,
                tail=framing.tail,
                model=job.model,
                shown=runtime.tokenizer.shown(framing),
            )
        check_token_ids(arrays, vocab_size=runtime.vocab_size, model=job.model)
        return job

    async def _sequences(
        self, job: EmbeddingJob, prefix: str, runtime: ModelRuntime, stop_at: int | None, meter: Meter
    ) -> list[list[int]]:
        """The id sequences to embed, checked against every limit: tokenized (stopping at the first
        limit broken) or the given ids."""
        spec, settings = runtime.spec, self._settings
        truncate = settings.truncate if job.truncate is None else job.truncate
        fits = runtime.batcher.longest_that_fits()
        stopped: Stop | None = None
        if job.texts is not None:
            refuse_above = min(fits, spec.max_input_tokens) if fits is not None else None
            limits = TokenLimits(
                per_input=spec.max_input_tokens,
                truncate=truncate,
                total=settings.max_tokens_per_request,
                budget=stop_at,
                refuse_above=refuse_above,
            )
            started = time.perf_counter()
            tokenized = await runtime.tokenizer.encode(job.texts, prefix, limits)
            self._metrics.observe_tokenize(spec.id, time.perf_counter() - started, tokenized.produced)
            sequences, stopped = tokenized.sequences, tokenized.stopped
        else:
            sequences = [list(ids) for ids in job.token_ids or ()]
        if runtime.eos_id is not None:
            sequences = ensure_last(sequences, runtime.eos_id)
        sequences = check_lengths(
            sequences,
            model=job.model,
            max_tokens=spec.max_input_tokens,
            truncate=truncate,
            max_total=settings.max_tokens_per_request,
            keep_last=runtime.eos_id is not None,
            fits=fits,
            partial=stopped is not None,
        )
        if stopped is Stop.BUDGET:
            raise await meter.over_limit(sum(len(ids) for ids in sequences))
        return sequences
