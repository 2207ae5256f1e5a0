"""`/v1/batches`: OpenAI's Batch API routes, thin like routes.py. A batch is created `validating`; the
batch runner (batches.runner) validates and runs it in the server's idle capacity. A key sees and
cancels only its own batches (another key's is a 404); admin keys see all."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from embedserve.api.auth import authenticate, authenticated
from embedserve.api.body import read_body
from embedserve.api.openapi import error_responses
from embedserve.api.responses import json_response
from embedserve.api.state import app_state
from embedserve.batches.params import parse_batch_create, parse_list_params
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
from embedserve.validation import parse_json

router = APIRouter(dependencies=[Depends(authenticate)])

_MAX_BODY = 64 * 1024
_ALWAYS = (AuthenticationFailed, ServiceUnavailable)  # (the database's outage is a 503)
_BODY = (InvalidRequest, InvalidJSON, InvalidType, MissingParameter, PayloadTooLarge)


@router.post("/v1/batches", responses=error_responses(*_BODY, FileNotFound, *_ALWAYS))
async def create_batch(request: Request) -> Response:
    state, principal = app_state(request.app), authenticated(request)
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


@router.get("/v1/batches", responses=error_responses(InvalidRequest, *_ALWAYS))
async def list_batches(request: Request) -> Response:
    state, principal = app_state(request.app), authenticated(request)
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


@router.get("/v1/batches/{batch_id}", responses=error_responses(BatchNotFound, *_ALWAYS))
async def retrieve_batch(request: Request, batch_id: str) -> Response:
    state = app_state(request.app)
    record = await asyncio.to_thread(state.batch_store.get, batch_id, authenticated(request))
    return json_response(batch_json(record))


@router.post("/v1/batches/{batch_id}/cancel", responses=error_responses(BatchNotFound, Conflict, *_ALWAYS))
async def cancel_batch(request: Request, batch_id: str) -> Response:
    """validating or in_progress -> cancelling; the runner stops taking its lines, keeps what is done,
    and ends it `cancelled`."""
    state = app_state(request.app)
    record = await asyncio.to_thread(state.batch_store.cancel, batch_id, authenticated(request))
    state.batches.wake()
    return json_response(batch_json(record))
