"""AppState: everything a running app owns (settings, catalog runtimes, key checker, service), built in
the lifespan and reachable from handlers as `request.app.state.embedserve`. No module-level state."""

from __future__ import annotations

from dataclasses import dataclass

from embedserve.api.auth import KeyChecker
from embedserve.catalog import Catalog
from embedserve.runtime import ModelRegistry
from embedserve.service import EmbeddingService
from embedserve.settings import Settings


@dataclass(slots=True)
class AppState:
    settings: Settings
    registry: ModelRegistry
    keys: KeyChecker
    service: EmbeddingService

    @classmethod
    def build(cls, settings: Settings, catalog: Catalog) -> AppState:
        registry = ModelRegistry(catalog, settings)
        return cls(settings=settings, registry=registry, keys=KeyChecker(settings.api_keys),
                   service=EmbeddingService(registry, settings))

    async def close(self) -> None:
        await self.registry.close()
