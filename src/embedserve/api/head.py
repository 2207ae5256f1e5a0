"""HEAD wherever GET is served: FastAPI's routes take only the methods they declare, so HEAD /health was a
405. A HEAD request whose path has a GET route is served as that GET, and its response goes out with the
GET's status and headers (Content-Length included) and no body; any other HEAD goes on unchanged."""

from __future__ import annotations

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        # A copy: the server reads the original scope's method, so it still writes no body for HEAD.
        as_get = {**scope, "method": "GET"}
        if not any(route.matches(as_get)[0] == Match.FULL for route in scope["app"].router.routes):
            await self.app(scope, receive, send)  # no GET here either: FastAPI's own 404 / 405
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(as_get, receive, headers_only)
        finally:
            if "route" in as_get:  # what routing found, for the access log and the metrics
                scope["route"] = as_get["route"]
