"""Thin HTTP handlers: parse, hand to the service, render. No try/except, no business logic."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.convertors import PathConvertor
from starlette.responses import Response

from embedserve.api.auth import admit, authenticate
from embedserve.api.body import read_body
from embedserve.api.context import context_of
from embedserve.api.lifetime import before, bounded
from embedserve.api.openapi import error_responses, with_subclasses
from embedserve.api.responses import json_response
from embedserve.api.state import app_state
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
    EmbedSparseRequest,
    EmbedSparseResponse,
    ModelCard,
    ModelList,
    TEIErrorResponse,
    model_card,
    render_embeddings,
    render_sparse,
)
from embedserve.types import Caller, Principal
from embedserve.validation import parse_embedding_request, parse_json, parse_sparse_request


class AnyTextConvertor(PathConvertor):
    """Starlette's `{name:path}` is `.*`, which stops at a newline: `GET /v1/models/%0A0` matched no
    route and got a 404 before authentication ran. `{name:any}` takes every character, so a request
    without a key is 401 and an unknown id with one is the route's own 404 model_not_found.
    (Registered by create_app through Starlette's documented hook: FastAPI compiles an included
    route's path again, so a route subclass with its own pattern would not survive `include_router`.)"""

    regex = "(?s:.*)"


def _principal(request: Request) -> Principal:
    """The caller, as the route's `authenticate` dependency found it (never a default: fail closed)."""
    principal = context_of(request).principal
    if principal is None:
        raise RuntimeError("an authenticated route ran without its authentication")
    return principal


#: The hot route: served by api.fastpath (no FastAPI dependency solving per request); registered here too,
#: so that the OpenAPI document describes it and FastAPI serves it wherever the fast path is not in front.
EMBEDDINGS_PATH = "/v1/embeddings"


async def create_embeddings(request: Request) -> Response:
    principal = await admit(request)  # the key and its request rate, before any body work
    state, context = app_state(request.app), context_of(request)
    settings = state.settings
    deadline = context.started + settings.request_timeout
    body = await before(deadline, settings.request_timeout, read_body(request, settings.max_body_bytes))
    job = parse_embedding_request(parse_json(body), max_inputs=settings.max_inputs_per_request)
    context.model = job.model
    caller = Caller(principal=principal, request_id=context.request_id, started=context.started)
    result = await bounded(
        request, state.embeddings.embed(job, caller), deadline=deadline, timeout_s=settings.request_timeout
    )
    context.model, context.inputs, context.tokens = result.model_id, job.count, result.prompt_tokens
    return Response(render_embeddings(result, job.model), media_type="application/json")


#: TEI's sparse route (api.errors.TEI_PATHS: its errors are TEI's shape).
EMBED_SPARSE_PATH = "/embed_sparse"


async def embed_sparse(request: Request) -> Response:
    """TEI's POST /embed_sparse, so that TEI's clients work unchanged: the /v1/embeddings pipeline asked
    for the sparse output alone, on the same key, limits, deadline and ledger (design note 61)."""
    principal = await admit(request)
    state, context = app_state(request.app), context_of(request)
    settings = state.settings
    deadline = context.started + settings.request_timeout
    body = await before(deadline, settings.request_timeout, read_body(request, settings.max_body_bytes))
    sparse_models = [
        spec.id for spec in state.engine.catalog.specs_for(principal) if "sparse" in spec.outputs
    ]
    job = parse_sparse_request(
        parse_json(body), sparse_models=sparse_models, max_inputs=settings.max_inputs_per_request
    )
    context.model = job.model
    caller = Caller(principal=principal, request_id=context.request_id, started=context.started)
    result = await bounded(
        request, state.embeddings.embed(job, caller), deadline=deadline, timeout_s=settings.request_timeout
    )
    context.model, context.inputs, context.tokens = result.model_id, job.count, result.prompt_tokens
    # x-compute-tokens: TEI's header for the tokens embedded (the usage the ledger records).
    return Response(
        render_sparse(result),
        media_type="application/json",
        headers={"x-compute-tokens": str(result.prompt_tokens)},
    )


async def list_models(request: Request) -> Response:
    registry = app_state(request.app).engine.registry
    cards = [
        model_card(
            spec, registry.status(spec), registry.backend_description(spec), registry.calibration(spec)
        )
        for spec in registry.catalog.specs_for(_principal(request))
    ]
    return json_response({"object": "list", "data": cards})


async def retrieve_model(request: Request, model_id: str) -> Response:
    registry = app_state(request.app).engine.registry
    spec = registry.catalog.resolve(model_id, _principal(request))
    card = model_card(
        spec,
        registry.status(spec),
        registry.backend_description(spec),
        registry.calibration(spec),
        ranges=True,
    )
    return json_response(card)


async def health(request: Request) -> Response:
    """Liveness: the process serves HTTP. `checks`: the usage ledger and the key store, for people and
    alerts; a degraded one never fails the probe."""
    return json_response({"status": "ok", "checks": app_state(request.app).checks()})


async def ready(request: Request) -> Response:
    """Readiness: every model is loaded and warmed up. A degraded ledger or key store stays ready (the
    embeddings are served): it shows in `checks`."""
    state = app_state(request.app)
    registry = state.engine.registry
    if state.draining:
        raise ShuttingDown("Not ready: the server is shutting down.", retry_after_s=5)
    if not registry.ready:
        raise ModelNotReady(f"Not ready: {registry.not_ready_reason()}", retry_after_s=2)
    return json_response({"status": "ready", "checks": state.checks()})


async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this server's metrics."""
    return Response(app_state(request.app).metrics.exposition(), media_type=CONTENT_TYPE)


#: (A plain Response class: FastAPI would otherwise list the error bodies under text/plain too.)
_METRICS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
}


def api_router() -> APIRouter:
    """The API's routes, built per app (after create_app registered the `any` convertor they use)."""
    router = APIRouter()
    router.add_api_route(
        EMBEDDINGS_PATH,
        create_embeddings,
        methods=["POST"],
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
    router.add_api_route(
        EMBED_SPARSE_PATH,
        embed_sparse,
        methods=["POST"],
        response_model=EmbedSparseResponse,
        responses=error_responses(
            *with_subclasses(InvalidRequest),
            AuthenticationFailed,
            ModelNotFound,
            PayloadTooLarge,
            RateLimitExceeded,
            *with_subclasses(ServiceUnavailable),
            body=TEIErrorResponse,
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": EmbedSparseRequest.model_json_schema()}},
            }
        },
    )
    authenticated = [Depends(authenticate)]
    router.add_api_route(
        "/v1/models",
        list_models,
        methods=["GET"],
        dependencies=authenticated,
        response_model=ModelList,
        responses=error_responses(AuthenticationFailed),
    )
    router.add_api_route(
        "/v1/models/{model_id:any}",
        retrieve_model,
        methods=["GET"],
        dependencies=authenticated,
        response_model=ModelCard,
        responses=error_responses(AuthenticationFailed, ModelNotFound),
    )
    router.add_api_route("/health", health, methods=["GET"], responses=error_responses(probe=True))
    router.add_api_route(
        "/ready", ready, methods=["GET"], responses=error_responses(ModelNotReady, ShuttingDown, probe=True)
    )
    router.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        response_class=Response,
        responses={**_METRICS_TEXT, **error_responses(probe=True)},
    )
    return router
