"""create_app(settings, catalog) -> the ASGI app. The lifespan opens AppState (database, keys), starts
loading the models in the background (so /health answers while they load) and closes everything on
shutdown, the usage ledger's last flush included (`on_closed` learns how many records were lost)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from embedserve import __version__
from embedserve.api.docs import router as docs_router
from embedserve.api.errors import install_error_handlers
from embedserve.api.fastpath import EmbeddingsFastPath
from embedserve.api.head import HeadAsGet
from embedserve.api.manage import router as manage_router
from embedserve.api.middleware import RequestContextMiddleware
from embedserve.api.openapi import install_document
from embedserve.api.routes import router
from embedserve.api.state import AppState
from embedserve.catalog import Catalog
from embedserve.settings import Settings

log = logging.getLogger("embedserve.app")

#: FastAPI's own OpenTelemetry hooks, off: the server's observability is its Prometheus metrics and
#: JSON access log, and FastAPI otherwise asks the global OTel providers on every request whether
#: they are configured.
NO_FASTAPI_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def create_app(
    settings: Settings,
    catalog: Catalog,
    on_ready: Callable[[AppState], None] | None = None,
    on_closed: Callable[[int], None] | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await AppState.open(settings, catalog)
        app.state.embedserve = state
        if state.keys.open:
            log.warning(
                "no API key configured: the server is OPEN to anyone who can reach "
                "%s:%d (set --api-key, or create a key with `embedserve keys create`)",
                settings.host,
                settings.port,
            )
        else:
            log.info(
                "API keys required (%d from the settings, %d in the key store); usage goes to %s",
                len(settings.api_keys) + len(settings.admin_keys),
                state.keys.managed_count,
                state.db.where,
            )
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
            lost = await state.close()
            if on_closed is not None:
                on_closed(lost)

    # docs_url=None: /docs is api.docs's page, whose Swagger UI files come from a package, not a CDN.
    app = FastAPI(
        title="embedserve",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible text-embeddings API",
        docs_url=None,
        redoc_url=None,
        telemetry=NO_FASTAPI_TELEMETRY,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(manage_router)
    app.include_router(docs_router)
    install_document(app)
    # Design note 40: `/v1/embeddings/` is a 404 like any unknown path, not a redirect;
    # HEAD is served wherever GET is.
    app.router.redirect_slashes = False
    app.add_middleware(HeadAsGet)
    app.add_middleware(EmbeddingsFastPath)  # inside the request context: ids, draining, accounting
    app.add_middleware(RequestContextMiddleware)
    return app
