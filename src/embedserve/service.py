"""EmbeddingService.embed(): the one place where the order of the pipeline is written
(resolve for the caller's key -> check against the model -> choose the prompt -> read token ids as the
model's own, or as the text of a tiktoken encoding's ids -> hold the request's estimated tokens from the
key's limit -> admit it to the model's queue -> tokenize, stopping at the first limit it breaks -> end
with EOS where the model pools on it -> check lengths -> settle the exact tokens -> batch -> finish ->
one usage record). Everything before tokenizing is cheap, so a request is refused before its work is
done, not after."""

from __future__ import annotations

import time
from dataclasses import replace

from embedserve import tiktoken_ids
from embedserve.errors import InvalidInputType
from embedserve.metrics import Metrics
from embedserve.postprocess import finish
from embedserve.prompts import choose_prefix
from embedserve.ratelimit import RateLimiter, TokenHold
from embedserve.runtime import ModelRegistry, ModelRuntime
from embedserve.settings import Settings
from embedserve.tokenization import Stop, TokenLimits, ensure_last
from embedserve.types import Caller, EmbeddingJob, EmbeddingResult, UsageRecord
from embedserve.usage import UsageLedger
from embedserve.validation import check_dimensions, check_framing, check_lengths, check_token_ids


class EmbeddingService:
    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        metrics: Metrics,
        limiter: RateLimiter,
        ledger: UsageLedger,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        self._limiter = limiter
        self._ledger = ledger

    async def embed(self, job: EmbeddingJob, caller: Caller) -> EmbeddingResult:
        spec = self._registry.catalog.resolve(job.model, caller.principal)
        check_dimensions(
            job.dimensions, model=job.model, native=spec.dimensions, allowed=spec.matryoshka_dimensions
        )
        prefix = choose_prefix(
            model=job.model,
            prompts=spec.prompts,
            default_prompt_name=spec.default_prompt_name,
            query_template=spec.query_template,
            default_instruction=spec.default_instruction,
            input_type=job.input_type,
            instruction=job.instruction,
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
        hold = self._limiter.hold_tokens(caller.principal, estimate)
        try:
            with runtime.batcher.admit(job.count) as admission:
                sequences = await self._sequences(job, prefix, runtime, hold)
                prompt_tokens = sum(len(ids) for ids in sequences)
                self._limiter.settle(hold, prompt_tokens)
                pooled = await runtime.batcher.embed(sequences, admission)  # [N, D]
        except BaseException:  # refused, or not embedded (overload, shutdown, cancelled): not counted
            self._limiter.release(hold)
            raise
        vectors = finish(pooled, dimensions=job.dimensions, normalize=spec.normalize)
        self._metrics.observe_embedded(spec.id, caller.principal.key_id, len(sequences), prompt_tokens)
        self._ledger.record(
            UsageRecord(
                key_id=caller.principal.key_id,
                model=spec.id,
                prompt_tokens=prompt_tokens,
                inputs=len(sequences),
                request_id=caller.request_id,
                created_at=time.time(),
                latency_ms=(time.perf_counter() - caller.started) * 1000,
                price_per_million=spec.price_per_million_input_tokens,
            )
        )
        return EmbeddingResult(
            vectors=vectors,
            encoding_format=job.encoding_format,
            prompt_tokens=prompt_tokens,
            model_id=spec.id,
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
        self, job: EmbeddingJob, prefix: str, runtime: ModelRuntime, hold: TokenHold
    ) -> list[list[int]]:
        """The id sequences to embed, checked against every limit: tokenized (stopping at the first
        limit broken) or the given ids."""
        spec, settings = runtime.spec, self._settings
        fits = runtime.batcher.longest_that_fits()
        stopped: Stop | None = None
        if job.texts is not None:
            refuse_above = min(fits, spec.max_input_tokens) if fits is not None else None
            limits = TokenLimits(
                per_input=spec.max_input_tokens,
                truncate=settings.truncate,
                total=settings.max_tokens_per_request,
                budget=hold.stop_at,
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
            truncate=settings.truncate,
            max_total=settings.max_tokens_per_request,
            keep_last=runtime.eos_id is not None,
            fits=fits,
            partial=stopped is not None,
        )
        if stopped is Stop.BUDGET:
            raise self._limiter.over_limit(hold, sum(len(ids) for ids in sequences))
        return sequences
