"""EmbeddingService.embed(): the one place where the order of the pipeline is written
(resolve -> check against the model -> tokenize -> check lengths -> batch -> finish)."""

from __future__ import annotations

from embedserve.postprocess import finish
from embedserve.runtime import ModelRegistry
from embedserve.settings import Settings
from embedserve.types import EmbeddingJob, EmbeddingResult
from embedserve.validation import check_dimensions, check_lengths, check_token_ids


class EmbeddingService:
    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self._registry = registry
        self._settings = settings

    async def embed(self, job: EmbeddingJob) -> EmbeddingResult:
        spec = self._registry.catalog.resolve(job.model)
        check_dimensions(job.dimensions, model=job.model, native=spec.dimensions,
                         allowed=spec.matryoshka_dimensions)
        runtime = self._registry.runtime(spec)
        if job.texts is not None:
            sequences = await runtime.tokenizer.encode(job.texts)
        else:
            assert job.token_ids is not None
            check_token_ids(job.token_ids, vocab_size=runtime.vocab_size, model=job.model)
            sequences = [list(ids) for ids in job.token_ids]
        sequences = check_lengths(sequences, model=job.model, max_tokens=spec.max_input_tokens,
                                  truncate=self._settings.truncate,
                                  max_total=self._settings.max_tokens_per_request)
        pooled = await runtime.batcher.embed(sequences)  # [N, D]
        vectors = finish(pooled, dimensions=job.dimensions, normalize=spec.normalize)
        return EmbeddingResult(vectors=vectors, encoding_format=job.encoding_format,
                               prompt_tokens=sum(len(ids) for ids in sequences))
