"""AppState: everything a running app owns (settings, catalog runtimes, key checker, service, metrics,
the draining flag), built in the lifespan and reachable from handlers as `request.app.state.embedserve`.
No module-level state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from embedserve.api.auth import KeyChecker
from embedserve.catalog import Catalog
from embedserve.metrics import Metrics
from embedserve.runtime import ModelRegistry
from embedserve.service import EmbeddingService
from embedserve.settings import Settings


@dataclass(slots=True)
class AppState:
    settings: Settings
    registry: ModelRegistry
    keys: KeyChecker
    service: EmbeddingService
    metrics: Metrics
    #: Set on SIGTERM: /ready answers 503 and new requests are turned away while in-flight ones finish.
    draining: bool = False
    #: Requests being served (probes and /metrics excluded); `idle` is set whenever it is 0.
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()
        self.metrics.in_flight.set_function(lambda: self.in_flight)

    def request_started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    @classmethod
    def build(cls, settings: Settings, catalog: Catalog) -> AppState:
        metrics = Metrics()
        registry = ModelRegistry(catalog, settings, metrics)
        return cls(settings=settings, registry=registry, keys=KeyChecker(settings.api_keys),
                   service=EmbeddingService(registry, settings, metrics), metrics=metrics)

    async def close(self) -> None:
        await self.registry.close()
