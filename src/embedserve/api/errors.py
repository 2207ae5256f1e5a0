"""THE translator: every exception, whatever raised it, becomes OpenAI's error JSON
`{"error": {"message", "type", "param", "code"}}` with the right status (TEI's `{"error", "error_type"}`
on TEI's routes, design note 61). Nothing else builds errors."""

from __future__ import annotations

import logging
from typing import Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from embedserve.api.context import context_of
from embedserve.errors import (
    EmbedServeError,
    EmptyInput,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotReady,
    PayloadTooLarge,
    RouteNotFound,
    ShuttingDown,
)

log = logging.getLogger("embedserve.api")


#: Whose error body a path answers: TEI's routes answer TEI's, so that TEI's clients read their errors.
ErrorShape = Literal["openai", "tei"]
TEI_PATHS = frozenset({"/embed_sparse"})


def error_shape(path: str) -> ErrorShape:
    return "tei" if path in TEI_PATHS else "openai"


def tei_error_type(exc: EmbedServeError) -> str:
    """TEI's `error_type` for an error (TEI's ErrorType names; its statuses stay ours: note 61)."""
    if isinstance(exc, EmptyInput):
        return "empty"
    if isinstance(exc, ModelNotReady | ShuttingDown):
        return "unhealthy"
    if exc.status in (429, 503):
        return "overloaded"
    return "backend" if exc.status >= 500 else "validation"


def error_body(exc: EmbedServeError, shape: ErrorShape = "openai") -> bytes:
    if shape == "tei":
        return orjson.dumps({"error": exc.message, "error_type": tei_error_type(exc)})
    return orjson.dumps(
        {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    )


def error_response(exc: EmbedServeError, shape: ErrorShape = "openai") -> Response:
    return Response(
        error_body(exc, shape), status_code=exc.status, media_type="application/json", headers=exc.headers()
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


def answer_error(exc: EmbedServeError, request_id: str, shape: ErrorShape = "openai") -> Response:
    """The response for an EmbedServeError raised while serving a request."""
    return error_response(answered(exc, request_id), shape)


def batch_line_error(exc: EmbedServeError, request_id: str) -> tuple[int, bytes]:
    """A batch line's failure as its own POST /v1/embeddings would have answered it: (status, body)."""
    shown = answered(exc, request_id)
    return shown.status, error_body(shown)


def install_error_handlers(app: FastAPI) -> None:
    async def on_embedserve_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EmbedServeError)
        return answer_error(exc, context_of(request).request_id, error_shape(request.scope["path"]))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        shape = error_shape(request.scope["path"])
        return error_response(from_http_exception(exc, request.method, request.url.path), shape)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        return error_response(
            InvalidRequest(str(first.get("msg", "invalid request")), param=".".join(loc) or None),
            error_shape(request.scope["path"]),
        )

    app.add_exception_handler(EmbedServeError, on_embedserve_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
