"""`/v1/batches`: OpenAI's Batch API routes, thin like routes.py. A batch is created `validating`; the
batch runner (batches.runner) validates and runs it in the server's idle capacity. A key sees and
cancels only its own batches (another key's is a 404); admin keys see all."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import Response

from embedserve.api.auth import authenticate
from embedserve.api.body import read_body
from embedserve.api.openapi import error_responses
from embedserve.api.responses import json_response
from embedserve.api.state import app_state
from embedserve.batches.params import LIST_LIMIT, parse_batch_create, parse_list_params
from embedserve.batches.records import batch_json, new_batch_id
from embedserve.errors import (
    AuthenticationFailed,
    BatchNotFound,
    Conflict,
    FileNotFound,
    InvalidJSON,
    InvalidRequest,
    InvalidType,
    MissingParameter,
    PayloadTooLarge,
    ServiceUnavailable,
)
from embedserve.protocol import BatchCreateRequest, BatchList, BatchObject
from embedserve.validation import parse_json

_MAX_BODY = 64 * 1024
_KEYED = (AuthenticationFailed, ServiceUnavailable)  # (the database's outage is a 503)
_BODY = (InvalidRequest, InvalidJSON, InvalidType, MissingParameter, PayloadTooLarge)
_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": BatchCreateRequest.model_json_schema()}},
    }
}
_LIST_QUERY = {
    "parameters": [
        {
            "name": "after",
            "in": "query",
            "schema": {"type": "string"},
            "description": "The last id of the previous page.",
        },
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": LIST_LIMIT[0], "maximum": LIST_LIMIT[1], "default": 20},
        },
    ]
}


async def create_batch(request: Request) -> Response:
    principal = await authenticate(request)
    state = app_state(request.app)
    params = parse_batch_create(parse_json(await read_body(request, _MAX_BODY)))
    source = await asyncio.to_thread(state.files.get, params.input_file_id, principal)
    if source.purpose != "batch":
        raise InvalidRequest(
            f"The file {source.id} was not uploaded with purpose 'batch'.", param="input_file_id"
        )
    record = await asyncio.to_thread(
        state.batch_store.create,
        batch_id=new_batch_id(),
        owner=principal.key_id,
        input_file_id=source.id,
        endpoint=params.endpoint,
        completion_window=params.completion_window,
        metadata=params.metadata,
        window_s=state.settings.batch_window,
    )
    state.batches.wake()
    return json_response(batch_json(record))


async def list_batches(request: Request) -> Response:
    principal = await authenticate(request)
    state = app_state(request.app)
    after, limit = parse_list_params(dict(request.query_params))
    page, more = await asyncio.to_thread(state.batch_store.page, principal, after=after, limit=limit)
    data = [batch_json(record) for record in page]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }
    )


async def retrieve_batch(request: Request, batch_id: str) -> Response:
    principal = await authenticate(request)
    record = await asyncio.to_thread(app_state(request.app).batch_store.get, batch_id, principal)
    return json_response(batch_json(record))


async def cancel_batch(request: Request, batch_id: str) -> Response:
    """validating or in_progress -> cancelling; the runner stops taking its lines, keeps what is done,
    and ends it `cancelled`."""
    principal = await authenticate(request)
    state = app_state(request.app)
    record = await asyncio.to_thread(state.batch_store.cancel, batch_id, principal)
    state.batches.wake()
    return json_response(batch_json(record))


def batches_router() -> APIRouter:
    """The routes, built per app (after create_app registered the `any` convertor: an id may hold any
    character and is then just not found). The cancel route comes first, or the `any` of the batch's
    route would take `ID/cancel` for an id."""
    router = APIRouter()
    router.add_api_route(
        "/v1/batches",
        create_batch,
        methods=["POST"],
        response_model=BatchObject,
        responses=error_responses(*_BODY, FileNotFound, *_KEYED),
        openapi_extra=_CREATE_BODY,
    )
    router.add_api_route(
        "/v1/batches",
        list_batches,
        methods=["GET"],
        response_model=BatchList,
        responses=error_responses(InvalidRequest, *_KEYED),
        openapi_extra=_LIST_QUERY,
    )
    router.add_api_route(
        "/v1/batches/{batch_id:any}/cancel",
        cancel_batch,
        methods=["POST"],
        response_model=BatchObject,
        responses=error_responses(BatchNotFound, Conflict, *_KEYED),
    )
    router.add_api_route(
        "/v1/batches/{batch_id:any}",
        retrieve_batch,
        methods=["GET"],
        response_model=BatchObject,
        responses=error_responses(BatchNotFound, *_KEYED),
    )
    return router
