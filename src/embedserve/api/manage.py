"""Management and usage routes, for admin keys only (others get 403): the key store (list, create,
show, update, revoke) and usage reports. Thin, like routes.py: the database work runs in a thread."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from embedserve.api.auth import require_admin
from embedserve.api.body import read_body
from embedserve.api.openapi import error_responses
from embedserve.api.responses import json_response
from embedserve.api.state import AppState, app_state
from embedserve.errors import (
    AuthenticationFailed,
    InvalidJSON,
    InvalidRequest,
    InvalidType,
    KeyNotFound,
    MissingParameter,
    PayloadTooLarge,
    PermissionDenied,
    ServiceUnavailable,
)
from embedserve.keys.records import key_json, parse_key_fields
from embedserve.usage import parse_query, report
from embedserve.validation import parse_json

router = APIRouter(dependencies=[Depends(require_admin)])

#: What each route can answer besides its success (the database's outage is a 503).
_ADMIN = (AuthenticationFailed, PermissionDenied, ServiceUnavailable)
_BODY = (InvalidRequest, InvalidJSON, InvalidType, MissingParameter, PayloadTooLarge)
_MAX_BODY = 64 * 1024


async def _changed(state: AppState) -> None:
    """This replica applies a change at once; the others within the key refresh interval."""
    await asyncio.to_thread(state.keys.refresh_sync)


@router.get("/v1/keys", responses=error_responses(*_ADMIN))
async def list_keys(request: Request) -> Response:
    records = await asyncio.to_thread(app_state(request.app).key_store.list_keys)
    return json_response({"object": "list", "data": [key_json(r) for r in records]})


@router.post("/v1/keys", status_code=201, responses=error_responses(*_BODY, *_ADMIN))
async def create_key(request: Request) -> Response:
    """Create a key. The response is the only place its secret (`key`) ever appears."""
    state = app_state(request.app)
    fields = parse_key_fields(parse_json(await read_body(request, _MAX_BODY)), creating=True)
    record, secret = await asyncio.to_thread(state.key_store.create, state.keys.pepper, fields)
    await _changed(state)
    return json_response({**key_json(record), "key": secret}, status=201)


@router.get("/v1/keys/{key_id}", responses=error_responses(KeyNotFound, *_ADMIN))
async def show_key(request: Request, key_id: str) -> Response:
    return json_response(key_json(await asyncio.to_thread(app_state(request.app).key_store.get, key_id)))


@router.patch("/v1/keys/{key_id}", responses=error_responses(*_BODY, KeyNotFound, *_ADMIN))
async def update_key(request: Request, key_id: str) -> Response:
    state = app_state(request.app)
    changes = parse_key_fields(parse_json(await read_body(request, _MAX_BODY)), creating=False)
    record = await asyncio.to_thread(state.key_store.update, key_id, changes)
    await _changed(state)
    return json_response(key_json(record))


@router.delete("/v1/keys/{key_id}", responses=error_responses(KeyNotFound, *_ADMIN))
async def revoke_key(request: Request, key_id: str) -> Response:
    """Revoke (the key stays listed, with `revoked_at`, so its usage keeps a name)."""
    state = app_state(request.app)
    record = await asyncio.to_thread(state.key_store.revoke, key_id)
    await _changed(state)
    return json_response(key_json(record))


@router.get("/v1/usage", responses=error_responses(InvalidRequest, InvalidType, *_ADMIN))
async def usage(request: Request) -> Response:
    """Usage report: `key`, `model`, `since`, `until` (ISO dates or date-times, UTC unless given),
    `group_by` (key | model | day | batch)."""
    state = app_state(request.app)
    query = parse_query(dict(request.query_params))
    await state.ledger.flush()  # this replica's pending records count too
    return json_response(await asyncio.to_thread(report, state.db, query))
