"""Thin HTTP handlers: parse, hand to the service, render. No try/except, no business logic."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.responses import Response

from embedserve.api.auth import admit, authenticate
from embedserve.api.body import read_body
from embedserve.api.lifetime import before, bounded
from embedserve.api.openapi import error_responses, with_subclasses
from embedserve.api.state import AppState
from embedserve.errors import (
    AuthenticationFailed,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    RateLimitExceeded,
    ServiceUnavailable,
    ShuttingDown,
)
from embedserve.metrics import CONTENT_TYPE
from embedserve.protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    model_card,
    render_embeddings,
)
from embedserve.types import Caller, Principal
from embedserve.validation import parse_embedding_request, parse_json


class AnyTextConvertor(PathConvertor):
    """Starlette's `{name:path}` is `.*`, which stops at a newline: `GET /v1/models/%0A0` matched no
    route and got a 404 before authentication ran. `{name:any}` takes every character, so a request
    without a key is 401 and an unknown id with one is the route's own 404 model_not_found.
    (Registered through Starlette's documented hook: FastAPI compiles an included route's path
    again, so a route subclass with its own pattern would not survive `include_router`.)"""

    regex = "(?s:.*)"


register_url_convertor("any", AnyTextConvertor())

router = APIRouter()


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.embedserve
    return state


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def _principal(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal


#: The hot route: served by api.fastpath (no FastAPI dependency solving per request); registered here too,
#: so that the OpenAPI document describes it and FastAPI serves it wherever the fast path is not in front.
EMBEDDINGS_PATH = "/v1/embeddings"


@router.post(
    EMBEDDINGS_PATH,
    response_model=EmbeddingResponse,
    responses=error_responses(
        *with_subclasses(InvalidRequest),
        AuthenticationFailed,
        ModelNotFound,
        PayloadTooLarge,
        RateLimitExceeded,
        *with_subclasses(ServiceUnavailable),
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EmbeddingRequest.model_json_schema()}},
        }
    },
)
async def create_embeddings(request: Request) -> Response:
    principal = await admit(request)  # the key and its request rate, before any body work
    state = _state(request)
    settings = state.settings
    deadline = request.state.started + settings.request_timeout
    body = await before(deadline, settings.request_timeout, read_body(request, settings.max_body_bytes))
    job = parse_embedding_request(parse_json(body), max_inputs=settings.max_inputs_per_request)
    request.state.model = job.model
    caller = Caller(principal=principal, request_id=request.state.request_id, started=request.state.started)
    result = await bounded(
        request, state.service.embed(job, caller), deadline=deadline, timeout_s=settings.request_timeout
    )
    request.state.model, request.state.inputs = result.model_id, job.count
    request.state.tokens = result.prompt_tokens
    return Response(render_embeddings(result, job.model), media_type="application/json")


@router.get(
    "/v1/models",
    dependencies=[Depends(authenticate)],
    response_model=ModelList,
    responses=error_responses(AuthenticationFailed),
)
async def list_models(request: Request) -> Response:
    registry = _state(request).registry
    cards = [
        model_card(spec, registry.status(spec), registry.backend_description(spec))
        for spec in registry.catalog.specs_for(_principal(request))
    ]
    return _json({"object": "list", "data": cards})


@router.get(
    "/v1/models/{model_id:any}",
    dependencies=[Depends(authenticate)],
    response_model=ModelCard,
    responses=error_responses(AuthenticationFailed, ModelNotFound),
)
async def retrieve_model(request: Request, model_id: str) -> Response:
    registry = _state(request).registry
    spec = registry.catalog.resolve(model_id, _principal(request))
    return _json(model_card(spec, registry.status(spec), registry.backend_description(spec)))


@router.get("/health", responses=error_responses(probe=True))
async def health(request: Request) -> Response:
    """Liveness: the process serves HTTP. `checks`: the usage ledger and the key store, for people and
    alerts; a degraded one never fails the probe."""
    return _json({"status": "ok", "checks": _state(request).checks()})


@router.get("/ready", responses=error_responses(ModelNotReady, ShuttingDown, probe=True))
async def ready(request: Request) -> Response:
    """Readiness: every model is loaded and warmed up. A degraded ledger or key store stays ready (the
    embeddings are served): it shows in `checks`."""
    state = _state(request)
    if state.draining:
        raise ShuttingDown("Not ready: the server is shutting down.", retry_after_s=5)
    if not state.registry.ready:
        raise ModelNotReady(f"Not ready: {state.registry.not_ready_reason()}", retry_after_s=2)
    return _json({"status": "ready", "checks": state.checks()})


#: (A plain Response class: FastAPI would otherwise list the error bodies under text/plain too.)
_METRICS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
}


@router.get("/metrics", response_class=Response, responses={**_METRICS_TEXT, **error_responses(probe=True)})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this server's metrics."""
    return Response(_state(request).metrics.exposition(), media_type=CONTENT_TYPE)
