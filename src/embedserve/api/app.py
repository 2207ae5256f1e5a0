"""create_app(settings, catalog) -> the ASGI app. The lifespan opens AppState (database, keys), starts
loading the models in the background (so /health answers while they load) and closes everything on
shutdown, the usage ledger's last flush included (`on_closed` learns how many records were lost)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.convertors import register_url_convertor

from embedserve import __version__
from embedserve.api.batches import batches_router
from embedserve.api.docs import router as docs_router
from embedserve.api.errors import install_error_handlers
from embedserve.api.fastpath import EmbeddingsFastPath, route_of
from embedserve.api.files import files_router
from embedserve.api.head import HeadAsGet
from embedserve.api.manage import router as manage_router
from embedserve.api.middleware import RequestContextMiddleware
from embedserve.api.openapi import install_document
from embedserve.api.routes import EMBEDDINGS_PATH, AnyTextConvertor, api_router
from embedserve.api.state import AppState
from embedserve.backends.factory import BackendFactory, make_backend
from embedserve.catalog import Catalog
from embedserve.errors import ModelLoadError
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
    backends: BackendFactory = make_backend,
) -> FastAPI:
    """`backends` builds each model's backend (the fake one in fast tests of the whole app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await AppState.open(settings, catalog, backends)
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
        state.start()  # the models load in the background: /health answers meanwhile

        async def announce() -> None:
            with contextlib.suppress(ModelLoadError):  # (each failure is logged; /ready names it)
                await state.engine.wait_loaded()
                if on_ready is not None:
                    on_ready(state)

        loaded = asyncio.create_task(announce(), name="announce-ready")
        try:
            yield
        finally:
            loaded.cancel()
            await asyncio.gather(loaded, return_exceptions=True)
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
    register_url_convertor("any", AnyTextConvertor())  # before the routes that use it are built
    api = api_router()
    app.include_router(api)
    app.include_router(manage_router)
    app.include_router(batches_router())
    app.include_router(files_router())
    app.include_router(docs_router)
    install_document(app)
    # Design note 40: `/v1/embeddings/` is a 404 like any unknown path, not a redirect;
    # HEAD is served wherever GET is.
    app.router.redirect_slashes = False
    app.add_middleware(HeadAsGet)
    # Inside the request context: ids, draining, accounting.
    app.add_middleware(EmbeddingsFastPath, route=route_of(api, EMBEDDINGS_PATH, "POST"))
    app.add_middleware(RequestContextMiddleware, routes=api.routes)
    return app
