"""Streaming multipart/form-data uploads: python_multipart's push parser is fed the request's chunks as they
arrive, and the form's `file` part goes straight to FileStore.receive, never whole in memory nor spooled
elsewhere; the few text fields are kept (bounded) and checked once the form has ended (design note 50)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from embedserve.errors import (
    ClientDisconnected,
    InvalidRequest,
    MissingParameter,
    PayloadTooLarge,
    RequestTimedOut,
)
from embedserve.files import FileStore, Received, check_purpose, parse_expires_after

#: The text fields an upload may carry; other fields are read past and ignored (as unknown JSON fields).
FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
FIELD_BYTES = 1024  # longer is no value of any of them
MAX_PARTS = 16
#: What a form may hold besides the file's bytes (boundaries, part headers, fields): the whole body may
#: pass --max-file-bytes by this much.
FORM_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Upload:
    """A whole, valid upload form: its file received (not yet committed) and its fields checked."""

    received: Received
    filename: str
    purpose: str
    expires_after_s: int | None


@dataclass(slots=True)
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)  # raw: parse_options_header reads bytes
    header_name: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    name: str | None = None
    value: bytearray = field(default_factory=bytearray)


def _text(raw: bytes) -> str:
    """A part header's text: UTF-8 as browsers and httpx send it, else Latin-1 as HTTP's own."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _boundary(content_type: str | None) -> bytes:
    media, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if media != b"multipart/form-data" or not boundary:
        got = "none" if not content_type else f"'{content_type[:64]}'"
        raise InvalidRequest(
            "POST /v1/files takes a multipart/form-data body with a 'file' part and a 'purpose' field "
            f"(Content-Type: multipart/form-data; boundary=...); got Content-Type {got}."
        )
    return boundary


def _too_large(store: FileStore) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The file is larger than the server's limit of {store.max_bytes} bytes; nothing of it was kept.",
        param="file",
    )


def _malformed(reason: str) -> InvalidRequest:
    return InvalidRequest(f"The multipart/form-data body is malformed: {reason}")


class _Form:
    """One request's form as its parser's events come: `events()` yields (kind, data) in body order."""

    def __init__(self, request: Request, store: FileStore, boundary: bytes, stall_s: float) -> None:
        self._request, self._store, self._stall_s = request, store, stall_s
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        queue = self._queue

        def event(kind: str) -> None:
            queue.append((kind, b""))

        def data(kind: str) -> Callable[[bytes, int, int], None]:
            return lambda chunk, start, end: queue.append((kind, chunk[start:end]))

        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": lambda: event("part_begin"),
                    "on_header_field": data("header_field"),
                    "on_header_value": data("header_value"),
                    "on_header_end": lambda: event("header_end"),
                    "on_headers_finished": lambda: event("headers_finished"),
                    "on_part_data": data("data"),
                    "on_part_end": lambda: event("part_end"),
                    "on_end": lambda: event("end"),
                },
            )
        except FormParserError as exc:  # e.g. a boundary over the parser's 256 bytes
            raise _malformed(str(exc)) from None

    async def _chunks(self) -> AsyncGenerator[bytes]:
        """The body, bounded: the whole form may pass the file limit by FORM_OVERHEAD_BYTES (an ignored
        field is no way around it), and a client that sends nothing for `stall_s` is dropped."""
        body = self._request.stream().__aiter__()
        limit = self._store.max_bytes + FORM_OVERHEAD_BYTES
        size = 0
        while True:
            try:
                async with asyncio.timeout(self._stall_s):
                    chunk = await anext(body)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimedOut(
                    f"The upload sent nothing for {self._stall_s:g} s (--request-timeout); it was dropped "
                    "and nothing of it was kept.",
                    retry_after_s=1,
                ) from None
            except ClientDisconnect:
                raise ClientDisconnected("The client closed the connection during the upload.") from None
            size += len(chunk)
            if size > limit:
                raise _too_large(self._store)
            yield chunk

    async def events(self) -> AsyncGenerator[tuple[str, bytes]]:
        async with contextlib.aclosing(self._chunks()) as chunks:
            async for chunk in chunks:
                try:
                    self._parser.write(chunk)
                except FormParserError as exc:
                    raise _malformed(str(exc)) from None
                while self._queue:
                    yield self._queue.popleft()


async def _file_bytes(events: AsyncGenerator[tuple[str, bytes]]) -> AsyncGenerator[bytes]:
    """The data of the part whose headers just ended, until that part ends."""
    async for kind, data in events:
        if kind == "data":
            if data:
                yield data
        elif kind == "part_end":
            return
    raise _malformed("it ended inside the file part, before the closing boundary")


class _Reader:
    """One form's state as its parser's events come, in body order."""

    def __init__(self, store: FileStore) -> None:
        self._store = store
        self.fields: dict[str, str] = {}
        self.received: Received | None = None
        self.filename = "file"
        self.ended = False
        self._part = _Part()
        self._parts = 0

    async def on(self, kind: str, data: bytes, events: AsyncGenerator[tuple[str, bytes]]) -> None:
        part = self._part
        if kind == "part_begin":
            self._part, self._parts = _Part(), self._parts + 1
        elif kind == "header_field":
            part.header_name += data
        elif kind == "header_value":
            part.header_value += data
        elif kind == "header_end":
            part.headers[_text(bytes(part.header_name)).strip().lower()] = bytes(part.header_value)
            part.header_name, part.header_value = bytearray(), bytearray()
        elif kind == "headers_finished":
            self._named(part)
            if part.name == "file":
                await self._receive(part, events)
        elif kind == "data" and part.name in FIELDS:
            part.value += data
            if len(part.value) > FIELD_BYTES:
                raise InvalidRequest(f"'{part.name}' is longer than {FIELD_BYTES} bytes.", param=part.name)
        elif kind == "part_end" and part.name in FIELDS:
            self.fields[part.name] = _text(bytes(part.value)).strip()
        elif kind == "end":
            self.ended = True

    def _named(self, part: _Part) -> None:
        if self._parts > MAX_PARTS:
            raise _malformed(f"more than {MAX_PARTS} parts")
        disposition, options = parse_options_header(part.headers.get("content-disposition"))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise _malformed("a part without 'Content-Disposition: form-data; name=...'")
        part.name = _text(name)
        if part.name == "file":
            self.filename = _text(options.get(b"filename", b"")) or "file"

    async def _receive(self, part: _Part, events: AsyncGenerator[tuple[str, bytes]]) -> None:
        if self.received is not None:
            raise InvalidRequest("An upload takes one 'file' part; this form has several.", param="file")
        if "purpose" in self.fields:  # (the OpenAI SDK sends it first: refused before any byte is kept)
            check_purpose(self.fields["purpose"])
        async with contextlib.aclosing(_file_bytes(events)) as file_bytes:
            self.received = await self._store.receive(file_bytes)

    def upload(self) -> Upload:
        """The form has been read: whole and valid, or a 400 naming what is not."""
        if not self.ended:
            raise _malformed("it ended before its closing boundary")
        if self.received is None:
            raise MissingParameter("An upload needs a 'file' part (the file's bytes).", param="file")
        purpose = check_purpose(self.fields.get("purpose"))
        expires_after_s = parse_expires_after(
            self.fields.get("expires_after[anchor]"), self.fields.get("expires_after[seconds]")
        )
        if self.received.bytes == 0:
            raise InvalidRequest("The file is empty.", param="file")
        return Upload(self.received, self.filename, purpose, expires_after_s)


async def receive_upload(request: Request, store: FileStore, *, stall_s: float) -> Upload:
    """Read an upload form whose `file` part streams into `store` and whose `purpose` may come before or
    after it. Refused before reading: not multipart (400), a declared length over the limit (413). A
    `purpose` that comes first is checked before any byte is written; any failure later, the form's own
    (400) or the store's (413, 507), removes what was received."""
    boundary = _boundary(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > store.max_bytes + FORM_OVERHEAD_BYTES:
        raise _too_large(store)
    reader = _Reader(store)
    try:
        async with contextlib.aclosing(_Form(request, store, boundary, stall_s).events()) as events:
            async for kind, data in events:
                await reader.on(kind, data, events)
        return reader.upload()
    except BaseException:
        if reader.received is not None:  # shielded: a second cancellation cannot leave it behind
            removal = asyncio.ensure_future(asyncio.to_thread(store.discard, reader.received))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(removal)
        raise
