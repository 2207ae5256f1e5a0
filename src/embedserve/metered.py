"""The server's embeddings: an engine call on a key's account, its tokens per minute held around the
pipeline and its usage recorded (the ledger and the per-key metrics). The engine knows no keys."""

from __future__ import annotations

import time

from embedserve.engine import Engine
from embedserve.metrics import Metrics
from embedserve.ratelimit import RateLimiter
from embedserve.types import Caller, EmbeddingJob, EmbeddingResult, UsageRecord
from embedserve.usage import UsageLedger


class MeteredEmbeddings:
    def __init__(self, engine: Engine, limiter: RateLimiter, ledger: UsageLedger, metrics: Metrics) -> None:
        self._engine = engine
        self._limiter = limiter
        self._ledger = ledger
        self._metrics = metrics

    async def embed(self, job: EmbeddingJob, caller: Caller) -> EmbeddingResult:
        """One usage record per request embedded; nothing for one refused or not embedded. (No await
        comes between the engine's answer and the record, so a cancellation cannot fall between.)"""
        principal = caller.principal
        result = await self._engine.run(job, principal, self._limiter.meter(principal))
        spec = self._engine.catalog.resolve(result.model_id)
        self._metrics.observe_embedded(
            spec.id, principal.key_id, len(result.token_counts), result.prompt_tokens
        )
        self._ledger.record(
            UsageRecord(
                key_id=principal.key_id,
                model=spec.id,
                prompt_tokens=result.prompt_tokens,
                inputs=len(result.token_counts),
                request_id=caller.request_id,
                created_at=time.time(),
                latency_ms=(time.perf_counter() - caller.started) * 1000,
                price_per_million=spec.price_per_million_input_tokens,
            )
        )
        return result
