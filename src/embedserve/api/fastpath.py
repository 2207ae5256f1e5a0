"""POST /v1/embeddings straight from the outer middleware to its handler (the one FastAPI would call),
past FastAPI's per-request machinery; every other request goes through FastAPI (design note 29)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from embedserve.api.context import context_of
from embedserve.api.errors import answer_error
from embedserve.api.routes import EMBEDDINGS_PATH, create_embeddings
from embedserve.errors import EmbedServeError


def route_of(router: APIRouter, path: str, method: str) -> BaseRoute:
    """The router's route of `method` on `path` (as routing would find it, for the access log)."""
    for route in router.routes:
        if getattr(route, "path", None) == path and method in (getattr(route, "methods", None) or ()):
            return route
    raise LookupError(f"no {method} {path} route")  # a wiring fault, caught when the app is built


class EmbeddingsFastPath:
    def __init__(
        self,
        app: ASGIApp,
        route: BaseRoute,
        handler: Callable[[Request], Awaitable[Response]] = create_embeddings,
    ) -> None:
        self.app = app
        self.handler = handler
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != EMBEDDINGS_PATH:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # as routing would set it: the access log and metrics read it
        request = Request(scope, receive, send)
        try:
            response = await self.handler(request)
        except EmbedServeError as exc:
            response = answer_error(exc, context_of(request).request_id)
        await response(scope, receive, send)
