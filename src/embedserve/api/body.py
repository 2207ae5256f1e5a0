"""Reading a request body without ever holding more than the configured limit: a declared
Content-Length over it is refused before reading, and a streamed body is cut off as soon as it passes.
A client that leaves mid-body is a 499 (ClientDisconnected), not a failure of ours."""

from __future__ import annotations

from fastapi import Request
from starlette.requests import ClientDisconnect

from embedserve.api.context import context_of
from embedserve.errors import ClientDisconnected, PayloadTooLarge


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than the server's limit of {limit} bytes. "
        "Split the input into several requests."
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected("The client closed the connection before sending the whole body.") from None
    context_of(request).body_bytes = size  # the request middleware trims the heap after large bodies
    return b"".join(chunks)
