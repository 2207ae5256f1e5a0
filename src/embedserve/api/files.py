"""OpenAI's Files API (`/v1/files`): upload (streamed to the file store, api.uploads), list, show, read and
delete. Thin, like routes.py: each route authenticates first; the store's blocking work runs in a thread.
A key sees only its own files (another key's are not found); an admin key sees all."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from embedserve.api.auth import authenticate
from embedserve.api.openapi import error_responses
from embedserve.api.responses import json_response
from embedserve.api.state import app_state
from embedserve.api.uploads import receive_upload
from embedserve.errors import (
    AuthenticationFailed,
    Conflict,
    FileNotFound,
    InsufficientStorage,
    InvalidRequest,
    MissingParameter,
    PayloadTooLarge,
    RequestTimedOut,
    ServiceUnavailable,
)
from embedserve.files import (
    MAX_LIST_LIMIT,
    UPLOAD_PURPOSES,
    deleted_json,
    file_json,
    parse_list_query,
)
from embedserve.files.records import MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S
from embedserve.protocol import FileDeleted, FileList, FileObject

#: Every route reads the database (its outage: 503).
_KEYED = (AuthenticationFailed, ServiceUnavailable)
READ_BYTES = 1 << 20  # of a file's content per read, in a thread

_UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The file: JSONL, one request a line, for a batch.",
                        },
                        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {
                            "type": "integer",
                            "minimum": MIN_EXPIRES_AFTER_S,
                            "maximum": MAX_EXPIRES_AFTER_S,
                        },
                    },
                }
            }
        },
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
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": MAX_LIST_LIMIT},
        },
        {
            "name": "order",
            "in": "query",
            "schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"},
        },
        {"name": "purpose", "in": "query", "schema": {"type": "string"}},
    ]
}
_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file's bytes",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
}


class _OpenFile:
    """A stored file's descriptor, read in threads. The lock makes `close` wait for a read still running
    in another thread (a response cancelled mid-read) before the descriptor goes."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def read(self, size: int, offset: int) -> bytes:
        with self._lock:
            return os.pread(self._fd, size, offset)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


class FileContent(Response):
    """A stored file's bytes from a descriptor opened before the response (a file deleted meanwhile is
    still sent whole), READ_BYTES at a time in a thread; it stops reading when the client leaves."""

    media_type = "application/octet-stream"

    def __init__(self, file: _OpenFile, size: int) -> None:
        super().__init__(headers={"content-length": str(size)})
        self._file, self._size = file, size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            sent = 0
            while sent < self._size and not watcher.done():
                chunk = await asyncio.to_thread(self._file.read, min(READ_BYTES, self._size - sent), sent)
                if not chunk:
                    raise RuntimeError(f"a stored file ended at {sent} of its {self._size} bytes")
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": sent < self._size})
            if self._size == 0:
                await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            # Not awaited: a cancelled response must not wait here; the lock orders it after any read.
            asyncio.get_running_loop().run_in_executor(None, self._file.close)


async def create_file(request: Request) -> Response:
    """Upload a file (`purpose`: `batch`): multipart/form-data, streamed to disk as it arrives; 413 as soon
    as it passes --max-file-bytes, 507 when the disk is down to --files-min-free."""
    principal = await authenticate(request)  # before any body work
    state = app_state(request.app)
    upload = await receive_upload(request, state.files, stall_s=state.settings.request_timeout)
    record = await asyncio.to_thread(
        state.files.commit,
        upload.received,
        principal.key_id,
        upload.filename,
        upload.purpose,
        expires_after_s=upload.expires_after_s,
    )
    return json_response(file_json(record))


async def list_files(request: Request) -> Response:
    """The key's files (an admin key's: everyone's), newest first by default; `after` pages."""
    principal = await authenticate(request)
    query = parse_list_query(request.query_params)
    records, has_more = await asyncio.to_thread(
        app_state(request.app).files.list,
        principal,
        after=query.after,
        limit=query.limit,
        order=query.order,
        purpose=query.purpose,
    )
    return json_response(
        {
            "object": "list",
            "data": [file_json(record) for record in records],
            "first_id": records[0].id if records else None,
            "last_id": records[-1].id if records else None,
            "has_more": has_more,
        }
    )


async def retrieve_file(request: Request, file_id: str) -> Response:
    principal = await authenticate(request)
    return json_response(
        file_json(await asyncio.to_thread(app_state(request.app).files.get, file_id, principal))
    )


async def file_content(request: Request, file_id: str) -> Response:
    """The file's bytes, as uploaded (or as the batch wrote them)."""
    principal = await authenticate(request)
    store = app_state(request.app).files

    def opened() -> tuple[_OpenFile, int]:
        record = store.get(file_id, principal)
        try:
            fd = os.open(store.path(record.id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # deleted between the row and the open
            raise FileNotFound(f"No such File object: {record.id}", param="id") from None
        return _OpenFile(fd), os.fstat(fd).st_size

    file, size = await asyncio.to_thread(opened)
    return FileContent(file, size)


async def delete_file(request: Request, file_id: str) -> Response:
    """Delete the file (409 while an unfinished batch reads it)."""
    principal = await authenticate(request)
    record = await asyncio.to_thread(app_state(request.app).files.delete, file_id, principal)
    return json_response(deleted_json(record))


def files_router() -> APIRouter:
    """The routes, built per app (after create_app registered the `any` convertor: an id may hold any
    character and is then just not found). The content route comes first, or the `any` of the file's
    route would take `ID/content` for an id."""
    router = APIRouter()
    router.add_api_route(
        "/v1/files",
        create_file,
        methods=["POST"],
        response_model=FileObject,
        responses=error_responses(
            InvalidRequest,
            MissingParameter,
            AuthenticationFailed,
            PayloadTooLarge,
            ServiceUnavailable,
            RequestTimedOut,
            InsufficientStorage,
        ),
        openapi_extra=_UPLOAD_FORM,
    )
    router.add_api_route(
        "/v1/files",
        list_files,
        methods=["GET"],
        response_model=FileList,
        responses=error_responses(InvalidRequest, *_KEYED),
        openapi_extra=_LIST_QUERY,
    )
    router.add_api_route(
        "/v1/files/{file_id:any}/content",
        file_content,
        methods=["GET"],
        response_class=Response,
        responses={**_CONTENT, **error_responses(FileNotFound, *_KEYED)},
    )
    router.add_api_route(
        "/v1/files/{file_id:any}",
        retrieve_file,
        methods=["GET"],
        response_model=FileObject,
        responses=error_responses(FileNotFound, *_KEYED),
    )
    router.add_api_route(
        "/v1/files/{file_id:any}",
        delete_file,
        methods=["DELETE"],
        response_model=FileDeleted,
        responses=error_responses(FileNotFound, Conflict, *_KEYED),
    )
    return router
