"""The OpenAPI document (/openapi.json): FastAPI's, finished here with the Bearer security scheme on every
route that needs a key, each route's real error answers (OpenAI's error body, listed by `error.code`),
and no 422, which the server never sends. Built once, when first asked for: no per-request work."""

from __future__ import annotations

import copy
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from embedserve.errors import EmbedServeError, InternalError, ShuttingDown
from embedserve.protocol import ErrorResponse

#: The scheme's name in components.securitySchemes (Swagger UI's Authorize dialog shows it).
BEARER = "bearerAuth"
#: Every route under it needs a key (the README's API table): the embeddings, models, keys and usage
#: routes. The probes, /openapi.json and /docs stay public.
KEYED_PREFIX = "/v1/"
#: Keyed routes outside it: TEI's, at TEI's paths.
KEYED_PATHS = frozenset({"/embed_sparse"})

_SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key (--api-key, --admin-key, or one made by `embedserve keys create`), sent "
    "as `Authorization: Bearer <key>`. The key and usage routes need an admin key.",
}

#: The headers errors.py's classes add to these statuses (`EmbedServeError.headers`).
_HEADERS: dict[int, dict[str, Any]] = {
    429: {
        "Retry-After": {
            "description": "Seconds until the key's window has room again.",
            "schema": {"type": "integer"},
        },
        "retry-after-ms": {"description": "The same wait in milliseconds.", "schema": {"type": "integer"}},
        "x-should-retry": {
            "description": "`false` when the request could never fit the key's limit.",
            "schema": {"type": "string"},
        },
    },
    503: {
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "required": True,
            "schema": {"type": "integer"},
        },
    },
    507: {
        "Retry-After": {
            "description": "Seconds to wait before uploading again.",
            "required": True,
            "schema": {"type": "integer"},
        },
    },
}

#: Answers of every route that are not its own: listed once, in the document's description.
_EVERY_ROUTE = """

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (but on TEI's
`/embed_sparse`, which answers TEI's `{"error", "error_type"}`); each operation lists
the statuses it answers and their `error.code`s. Besides those, any request can get 404 `not_found`
(unknown route), 405 `method_not_allowed` (another method on a known path), 408 `header_timeout` and
431 `headers_too_large` (the request line and headers came too slowly or too large; the connection
closes). The server never answers 422: an invalid request is a 400 whose `param` names the field."""


def _codes(errors: list[type[EmbedServeError]]) -> str:
    return ", ".join(dict.fromkeys(f"`{error.code}`" for error in errors if error.code))


def error_responses(
    *errors: type[EmbedServeError], probe: bool = False, body: type[BaseModel] = ErrorResponse
) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that raises `errors`: one `body` entry per status (ErrorResponse, or
    TEI's on its routes), whose description lists the `error.code`s. Every route can also answer a
    bug's 500, and every route but a probe (api.middleware.PROBES) the 503 `shutting_down` of a
    draining server."""
    answered = [*errors, *(() if probe else (ShuttingDown,)), InternalError]
    by_status: dict[int, list[type[EmbedServeError]]] = {}
    for error in answered:
        by_status.setdefault(error.status, []).append(error)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, classes in sorted(by_status.items()):
        entry: dict[str, Any] = {
            "model": body,
            "description": f"{HTTPStatus(status).phrase}: {_codes(classes)}",
        }
        if status in _HEADERS:
            entry["headers"] = copy.deepcopy(_HEADERS[status])
        responses[status] = entry
    return responses


def with_subclasses(error: type[EmbedServeError]) -> list[type[EmbedServeError]]:
    """`error` and every class below it in the error tree, for a route that may raise any of them."""
    return [error, *(sub for child in error.__subclasses__() for sub in with_subclasses(child))]


def _drop_validation_schemas(document: dict[str, Any]) -> None:
    """FastAPI adds a 422 with HTTPValidationError to every operation with parameters; the server
    answers a 400 instead (api.errors turns RequestValidationError into InvalidRequest)."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def finish_document(document: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document -> the one the server serves (a new dict; `document` is left as it was)."""
    finished = copy.deepcopy(document)
    _drop_validation_schemas(finished)
    schemes = finished.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[BEARER] = copy.deepcopy(_SECURITY_SCHEME)
    for path, operations in finished.get("paths", {}).items():
        if path.startswith(KEYED_PREFIX) or path in KEYED_PATHS:
            for operation in operations.values():
                operation["security"] = [{BEARER: []}]
    finished["info"]["description"] = finished["info"].get("description", "") + _EVERY_ROUTE
    return finished


def install_document(app: FastAPI) -> None:
    """`app.openapi` (what /openapi.json and /docs read) gives the finished document, made on the first
    call and kept where FastAPI keeps its own (`app.openapi_schema`)."""
    fastapi_document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish_document(fastapi_document())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it
