"""EmbeddingService.embed(): the one place where the order of the pipeline is written
(resolve -> check against the model -> choose the prompt -> tokenize -> end with EOS where the model
pools on it -> check lengths -> batch -> finish)."""

from __future__ import annotations

import time

from embedserve.errors import InvalidInputType
from embedserve.metrics import Metrics
from embedserve.postprocess import finish
from embedserve.prompts import choose_prefix
from embedserve.runtime import ModelRegistry
from embedserve.settings import Settings
from embedserve.tokenization import ensure_last
from embedserve.types import EmbeddingJob, EmbeddingResult, Principal
from embedserve.validation import check_dimensions, check_lengths, check_token_ids


class EmbeddingService:
    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self._registry = registry
        self._settings = settings
        self._metrics = metrics

    async def embed(self, job: EmbeddingJob, principal: Principal) -> EmbeddingResult:
        spec = self._registry.catalog.resolve(job.model)
        check_dimensions(job.dimensions, model=job.model, native=spec.dimensions,
                         allowed=spec.matryoshka_dimensions)
        prefix = choose_prefix(model=job.model, prompts=spec.prompts,
                               default_prompt_name=spec.default_prompt_name,
                               query_template=spec.query_template,
                               default_instruction=spec.default_instruction,
                               input_type=job.input_type, instruction=job.instruction)
        runtime = self._registry.runtime(spec)
        if job.texts is not None:
            started = time.perf_counter()
            sequences = await runtime.tokenizer.encode(job.texts, prefix)
            self._metrics.observe_tokenize(spec.id, time.perf_counter() - started)
        else:
            assert job.token_ids is not None
            if prefix and job.input_type is not None:
                raise InvalidInputType(
                    f"input_type {job.input_type!r} puts {prefix!r} in front of the text on the model "
                    f"'{job.model}', which token ids cannot take: send text, or include the prefix's "
                    "tokens in the ids and leave out input_type.", param="input_type")
            check_token_ids(job.token_ids, vocab_size=runtime.vocab_size, model=job.model)
            sequences = [list(ids) for ids in job.token_ids]
        if runtime.eos_id is not None:
            sequences = ensure_last(sequences, runtime.eos_id)
        sequences = check_lengths(sequences, model=job.model, max_tokens=spec.max_input_tokens,
                                  truncate=self._settings.truncate,
                                  max_total=self._settings.max_tokens_per_request,
                                  keep_last=runtime.eos_id is not None)
        pooled = await runtime.batcher.embed(sequences)  # [N, D]
        vectors = finish(pooled, dimensions=job.dimensions, normalize=spec.normalize)
        tokens = sum(len(ids) for ids in sequences)
        self._metrics.observe_embedded(spec.id, principal.key_id, len(sequences), tokens)
        return EmbeddingResult(vectors=vectors, encoding_format=job.encoding_format,
                               prompt_tokens=tokens, model_id=spec.id)
