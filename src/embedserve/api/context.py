"""The typed context of one HTTP request: what the request middleware, the handlers and the access log
share about it (its id and start, its key, its model and counts, its body's size, extra headers)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import Scope

from embedserve.types import Principal

#: Where the middleware keeps it: the ASGI scope's "state", which is also Starlette's `request.state`.
_KEY = "embedserve"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float  # time.perf_counter() at arrival
    principal: Principal | None = None  # set by authentication
    model: str | None = None  # as the request named it, then the catalog id it resolved to
    inputs: int | None = None
    tokens: int | None = None
    body_bytes: int = 0  # a large body is followed by a heap trim
    #: Headers to add to whatever response the request gets (a limited key's x-ratelimit-*).
    response_headers: Callable[[], Awaitable[list[tuple[str, str]]]] | None = None

    def attach(self, scope: Scope) -> None:
        scope.setdefault("state", {})[_KEY] = self


def context_of(request: Request) -> RequestContext:
    """The request's context (the request middleware attached it before any handler runs)."""
    context: RequestContext = request.scope["state"][_KEY]
    return context
