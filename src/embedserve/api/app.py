"""create_app(settings, catalog) -> the ASGI app. The lifespan opens AppState (database, keys), starts
loading the models in the background (so /health answers while they load) and closes everything on
shutdown, the usage ledger's last flush included."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from embedserve import __version__
from embedserve.api.errors import install_error_handlers
from embedserve.api.manage import router as manage_router
from embedserve.api.middleware import RequestContextMiddleware
from embedserve.api.routes import router
from embedserve.api.state import AppState
from embedserve.catalog import Catalog
from embedserve.settings import Settings

log = logging.getLogger("embedserve.app")


def create_app(settings: Settings, catalog: Catalog,
               on_ready: Callable[[AppState], None] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await AppState.open(settings, catalog)
        app.state.embedserve = state
        if state.keys.open:
            log.warning("no API key configured: the server is OPEN to anyone who can reach "
                        "%s:%d (set --api-key, or create a key with `embedserve keys create`)",
                        settings.host, settings.port)
        else:
            log.info("API keys required (%d from the settings, %d in the key store); usage goes to %s",
                     len(settings.api_keys) + len(settings.admin_keys), state.keys.managed_count,
                     state.db.where)
        state.start()

        async def load() -> None:
            await state.registry.load_all()
            if state.registry.ready and on_ready is not None:
                on_ready(state)

        loading = asyncio.create_task(load(), name="load-models")
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await state.close()

    app = FastAPI(title="embedserve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible text-embeddings API", docs_url="/docs",
                  redoc_url=None)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(manage_router)
    app.add_middleware(RequestContextMiddleware)
    return app
