"""THE translator: every exception, whatever raised it, becomes OpenAI's error JSON
`{"error": {"message", "type", "param", "code"}}` with the right status. Nothing else builds errors."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from embedserve.api.context import context_of
from embedserve.errors import (
    EmbedServeError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
)

log = logging.getLogger("embedserve.api")


def error_body(exc: EmbedServeError) -> bytes:
    return orjson.dumps(
        {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    )


def error_response(exc: EmbedServeError) -> Response:
    return Response(
        error_body(exc), status_code=exc.status, media_type="application/json", headers=exc.headers()
    )


def internal_error(request_id: str) -> InternalError:
    return InternalError(
        "The server had an error while processing your request. Quote request id "
        f"{request_id} when you report it."
    )


def from_http_exception(exc: StarletteHTTPException, method: str, path: str) -> EmbedServeError:
    if exc.status_code == 404:
        return RouteNotFound(f"Unknown route: {method} {path}")
    if exc.status_code == 405:
        return MethodNotAllowed(f"Method {method} is not allowed on {path}")
    if exc.status_code == 413:
        return PayloadTooLarge(str(exc.detail))
    if 400 <= exc.status_code < 500:
        return InvalidRequest(str(exc.detail), status=exc.status_code)
    return InternalError(str(exc.detail))


def answered(exc: EmbedServeError, request_id: str) -> EmbedServeError:
    """The error a client is shown: its own, except for a fault of ours (5xx without Retry-After), which
    is logged and shown as the generic 500."""
    if exc.status >= 500 and not exc.headers():  # a fault of ours, not a "come back later"
        log.error("request failed: %s", exc.message, exc_info=exc)
        return internal_error(request_id)
    return exc


def answer_error(exc: EmbedServeError, request_id: str) -> Response:
    """The response for an EmbedServeError raised while serving a request."""
    return error_response(answered(exc, request_id))


def batch_line_error(exc: EmbedServeError, request_id: str) -> tuple[int, bytes]:
    """A batch line's failure as its own POST /v1/embeddings would have answered it: (status, body)."""
    shown = answered(exc, request_id)
    return shown.status, error_body(shown)


def install_error_handlers(app: FastAPI) -> None:
    async def on_embedserve_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EmbedServeError)
        return answer_error(exc, context_of(request).request_id)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(from_http_exception(exc, request.method, request.url.path))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        return error_response(
            InvalidRequest(str(first.get("msg", "invalid request")), param=".".join(loc) or None)
        )

    app.add_exception_handler(EmbedServeError, on_embedserve_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
