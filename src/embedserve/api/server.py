"""The HTTP server: uvicorn with every limit explicit, a connection guard that keeps the HTTP edge's
promises (head timeout and size, OpenAI-shaped refusals), and a drain on SIGTERM (design notes 21, 22, 39)."""

from __future__ import annotations

import asyncio
import http
import logging
import socket
import uuid
from collections import deque
from itertools import chain
from types import FrameType
from typing import Any

import httptools
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from embedserve.api.errors import error_body
from embedserve.api.state import AppState, app_state
from embedserve.errors import (
    EmbedServeError,
    HeadersTooLarge,
    HeaderTimeout,
    MalformedRequest,
    WebSocketNotSupported,
)
from embedserve.logs import request_id_var
from embedserve.settings import Settings

log = logging.getLogger("embedserve.server")

#: The `route` label of requests the HTTP layer answers itself, before any routing.
REFUSED_ROUTE = "-"
#: After a refusal, how long the client's remaining bytes are read and dropped before closing.
LINGER_S = 2.0


def _app_state(app: Any) -> AppState | None:
    """The running app's state, once its lifespan has opened it (a signal or a refusal may come first)."""
    try:
        return app_state(app)
    except LookupError:
        return None


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a request that has been refused."""


class GuardedProtocol(HttpToolsProtocol):
    """httptools' protocol, keeping the HTTP edge's promises (design notes 21 and 39):

    - the request head (request line and headers) must arrive within `header_timeout_s` (else 408) and
      stay under `max_header_bytes` (else 431), counted on what the parser read (URL, header names and
      values) however the bytes arrived, and on the raw bytes of a head still incomplete;
    - whatever the parser refuses (uvicorn answers text/plain), and WebSocket upgrades (the server does
      not speak WebSocket; Starlette answered an empty 403), get an OpenAI error body with a fresh
      X-Request-ID, then the connection closes;
    - requests pipelined before the refused one get their own full answers first.

    Idle keep-alive connections are uvicorn's own timeout."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 32 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Raw bytes read while the head is incomplete: a lower bound (a read it began in the middle of is
        # left out, since that read's other bytes belong to the request before), and an upper bound.
        self._head_bytes = self._head_bound = 0
        self._reading = 0  # the size of the read being parsed
        self._head_started = self.loop.time()
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: EmbedServeError | None = None  # answered once the responses before it are out
        self._answered = False
        self._running: RequestResponseCycle | None = None  # the cycle whose app was started last
        self._first_bytes: bytes | None = None  # how the connection began (TLS? HTTP/2?)
        self._completed = 0  # requests fully received on this connection
        self._start_head()

    # ---- the request head: time and size ----------------------------------------------------------

    def _start_head(self) -> None:
        self._awaiting_head = True
        self._head_bytes, self._head_bound = 0, self._reading
        self._head_started = self.loop.time()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _end_head(self) -> None:
        self._awaiting_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head:
            self._refuse(
                HeaderTimeout(
                    f"The request line and headers did not arrive within {self.header_timeout_s:g} s."
                )
            )

    def _too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"The request line and headers are larger than the server's limit of "
            f"{self.max_header_bytes} bytes."
        )

    # ---- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._awaiting_head:  # the next request on a kept-alive connection
            self._start_head()

    def on_headers_complete(self) -> None:
        self._end_head()
        # What the parser read of the head (URL, header names and values), however it arrived (a head
        # still incomplete is bounded by its raw bytes in data_received, so at most a read is buffered).
        # Summed only when the bytes received could hold that much: a normal head costs a comparison.
        if (
            self._head_bound > self.max_header_bytes
            and len(self.url) + sum(map(len, chain.from_iterable(self.headers))) > self.max_header_bytes
        ):
            self._refuse(self._too_large())
            raise _HeadRefused  # stops the parser; no cycle was made for this request
        if self._get_upgrade() == b"websocket":
            self._refuse(
                WebSocketNotSupported(
                    "This server does not speak WebSocket; send plain HTTP requests (POST /v1/embeddings)."
                )
            )
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is None:
            self._completed += 1
            super().on_message_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    # ---- the connection -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with every parser error answered as ours, and the head's size checked."""
        if self._refusal is not None:
            return  # the connection closes once the answers before the refusal are out
        if self._first_bytes is None:
            self._first_bytes = data[:16]
        self._unset_keepalive_if_required()
        if self._awaiting_head:
            self._head_bytes += len(data)
            self._head_bound += len(data)
        self._reading = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # WebSocket: refused when its head completed; others (h2c) are served as HTTP/1.1
        except httptools.HttpParserError as exc:
            if self._refusal is None:  # (not already refused by one of our callbacks)
                self._refuse(self._malformed(exc))
            return
        if self._awaiting_head and self._head_bytes > self.max_header_bytes:
            self._refuse(self._too_large())

    def _malformed(self, exc: httptools.HttpParserError) -> MalformedRequest:
        first = self._first_bytes or b""
        if self._completed == 0 and first[:1] == b"\x16":  # a TLS handshake record
            return MalformedRequest(
                "This server speaks plain HTTP, not TLS: use an http:// URL, or put "
                "a TLS-terminating proxy in front of it."
            )
        if self._completed == 0 and first.startswith(b"PRI * HTTP/2"):
            return MalformedRequest("This server speaks HTTP/1.1, not HTTP/2.")
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            return MalformedRequest(
                "The request does not start with an HTTP method this server knows "
                "(GET, HEAD, POST, PATCH, DELETE, ...)."
            )
        if isinstance(exc, httptools.HttpParserCallbackError):  # (its cause may quote the request)
            return MalformedRequest("The request line or headers could not be parsed.")
        return MalformedRequest(f"The request is not valid HTTP/1.1: {exc}.")  # llhttp's fixed reasons

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # (starts the next pipelined request, if any)
        if self._refusal is not None:
            self._answer_refusal()

    # ---- refusals -------------------------------------------------------------------------------

    def _refuse(self, exc: EmbedServeError) -> None:
        """Answer `exc` to the request being parsed, after the responses to the requests before it,
        then close the connection."""
        self._end_head()
        if self._refusal is not None or self.transport.is_closing():
            return
        self._refusal = exc
        cycle = self.cycle
        if cycle is not None and cycle.more_body:  # the fault is in this request's own body
            if cycle.response_started:  # its app answered it already (before reading the body)
                self._answered = True  # one answer per request: close after the app's
                if cycle.response_complete:
                    self.transport.close()
                else:
                    cycle.keep_alive = False
                return
            # Drop the request; its answer is the refusal.
            if any(queued is cycle for queued, _ in self.pipeline):
                self.pipeline = deque(item for item in self.pipeline if item[0] is not cycle)
            cycle.disconnected = True  # its app reads http.disconnect, and what it sends is dropped
            cycle.message_event.set()
        self._answer_refusal()

    def _answer_refusal(self) -> None:
        running = self._running
        if self.pipeline or (
            running is not None and not running.response_complete and not running.disconnected
        ):
            return  # on_response_complete calls again
        exc = self._refusal
        if exc is None or self._answered or self.transport.is_closing():
            return
        request_id = uuid.uuid4().hex
        body = error_body(exc)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", request_id.encode()),
            (b"connection", b"close"),
            *((k.lower().encode(), v.encode()) for k, v in exc.headers().items()),
        ]
        head = b"HTTP/1.1 %d %s\r\n" % (exc.status, http.HTTPStatus(exc.status).phrase.encode())
        self.transport.write(head + b"".join(b"%s: %s\r\n" % h for h in headers) + b"\r\n" + body)
        self._answered = True
        self._linger()
        self._report(exc, request_id)

    def _linger(self) -> None:
        """Close after the answer without losing it: closing a socket with unread bytes (the rest of a
        100 KB URL) sends a reset, which can destroy the answer before the client reads it. So only
        our side is shut, the client's bytes are read and dropped until it closes (uvicorn's
        eof_received then closes the transport) or LINGER_S pass (what nginx's lingering close does)."""
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _report(self, exc: EmbedServeError, request_id: str) -> None:
        """The refusal's log line and its count in embedserve_requests_total (route "-", model "-").
        A connection that never sent a byte (a browser's spare connection, a port scan) made no request:
        its 408 is logged at debug level and not counted."""
        silent = self._first_bytes is None
        state = _app_state(self.config.app)
        if state is not None and not silent:
            seconds = self.loop.time() - self._head_started
            state.metrics.observe_request(REFUSED_ROUTE, "-", exc.status, seconds)
        token = request_id_var.set(request_id)
        try:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            log.log(
                logging.DEBUG if silent else logging.INFO,
                "refused %d %s from %s: %s",
                exc.status,
                exc.code,
                client,
                exc.message,
                extra={"event": "refused", "status": exc.status, "code": exc.code, "client": client},
            )
        finally:
            request_id_var.reset(token)


def guarded_protocol(settings: Settings) -> type[GuardedProtocol]:
    """GuardedProtocol with this server's limits (uvicorn builds one protocol object per connection)."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"header_timeout_s": settings.header_timeout, "max_header_bytes": settings.max_header_bytes},
    )


class EmbedServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping: the app's state is marked
    draining (/ready 503, new requests 503 with Connection: close), in-flight requests get up to
    `shutdown_grace` seconds to finish, then uvicorn's own shutdown runs (listener closed, lifespan
    shutdown). A second signal falls through to uvicorn (a second SIGINT exits at once)."""

    def __init__(self, config: uvicorn.Config, shutdown_grace: float) -> None:
        super().__init__(config)
        self._grace = shutdown_grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _state(self) -> AppState | None:
        return _app_state(self.config.app)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._state()
        if state is None or state.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        state.draining = True
        log.info(
            "draining: %d request(s) in flight, up to %.0f s",
            state.in_flight,
            self._grace,
            extra={"event": "draining", "in_flight": state.in_flight},
        )
        self._loop.call_soon_threadsafe(self._start_drain, state)

    def _start_drain(self, state: AppState) -> None:
        assert self._loop is not None
        self._drain_task = self._loop.create_task(self.drain(state))

    async def drain(self, state: AppState) -> None:
        """Wait for in-flight requests (at most the grace period), then let uvicorn shut down. The batch
        runner takes no new line from now on (AppState.close waits for those in flight)."""
        await state.drain(self._grace)
        self.should_exit = True


def build_server(app: FastAPI, settings: Settings, **config: Any) -> EmbedServer:
    """The server for `app`, with every limit explicit. `config` overrides uvicorn.Config's arguments
    (the tests pass their own socket and logging)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "server_header": False,
        "http": guarded_protocol(settings),
        "ws": "none",  # no WebSocket routes: GuardedProtocol answers upgrades with a 400
        "timeout_keep_alive": 30,  # idle keep-alive connections
        "timeout_graceful_shutdown": 1,  # after our drain, only stragglers past the grace are left
        **config,
    }
    return EmbedServer(uvicorn.Config(app, **options), shutdown_grace=settings.shutdown_grace)
