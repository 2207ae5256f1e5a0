"""The HTTP server: uvicorn with its limits set explicitly, a connection guard against slow-loris and
header floods (uvicorn has no request-head timeout and httptools no header size limit), and a graceful
drain on SIGTERM (/ready turns 503 and new requests are refused while in-flight requests finish)."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from embedserve.api.errors import error_body
from embedserve.api.state import AppState
from embedserve.errors import EmbedServeError, HeadersTooLarge, HeaderTimeout
from embedserve.settings import Settings

log = logging.getLogger("embedserve.server")

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedProtocol(HttpToolsProtocol):
    """httptools' protocol plus two limits on the request head (request line and headers): it must
    arrive within `header_timeout_s` and stay under `max_header_bytes`, or the connection gets an
    OpenAI-shaped 408 / 431 and is closed. Idle keep-alive connections are uvicorn's own timeout."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 32 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._start_head()

    def _start_head(self) -> None:
        self._awaiting_head = True
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _end_head(self) -> None:
        self._awaiting_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._awaiting_head:  # the next request on a kept-alive connection
            self._start_head()

    def on_headers_complete(self) -> None:
        self._end_head()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._awaiting_head and self._head_bytes > self.max_header_bytes:
            self._refuse(HeadersTooLarge(f"The request line and headers are larger than the server's "
                                         f"limit of {self.max_header_bytes} bytes."))

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head:
            self._refuse(HeaderTimeout(f"The request line and headers did not arrive within "
                                       f"{self.header_timeout_s:g} s."))

    def _refuse(self, exc: EmbedServeError) -> None:
        self._end_head()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # never interleave with a response
            body = error_body(exc)
            head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % (exc.status, _REASONS[exc.status], len(body)))
            self.transport.write(head + body)
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedProtocol]:
    """GuardedProtocol with this server's limits (uvicorn builds one protocol object per connection)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"header_timeout_s": settings.header_timeout,
                                                        "max_header_bytes": settings.max_header_bytes})


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
        app = self.config.app
        state: AppState | None = getattr(app.state, "embedserve", None) if isinstance(app, FastAPI) \
            else None
        return state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._state()
        if state is None or state.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        state.draining = True
        log.info("draining: %d request(s) in flight, up to %.0f s", state.in_flight, self._grace,
                 extra={"event": "draining", "in_flight": state.in_flight})
        self._loop.call_soon_threadsafe(self._start_drain, state)

    def _start_drain(self, state: AppState) -> None:
        assert self._loop is not None
        self._drain_task = self._loop.create_task(self.drain(state))

    async def drain(self, state: AppState) -> None:
        """Wait for in-flight requests (at most the grace period), then let uvicorn shut down."""
        state.draining = True
        try:
            await asyncio.wait_for(state.idle.wait(), self._grace)
        except TimeoutError:
            log.warning("grace period over with %d request(s) still in flight", state.in_flight)
        self.should_exit = True


def build_server(app: FastAPI, settings: Settings, **config: Any) -> EmbedServer:
    """The server for `app`, with every limit explicit. `config` overrides uvicorn.Config's arguments
    (the tests pass their own socket and logging)."""
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_config": None, "access_log": False,
        "server_header": False, "http": guarded_protocol(settings),
        "timeout_keep_alive": 30,  # idle keep-alive connections
        "timeout_graceful_shutdown": 1,  # after our drain, only stragglers past the grace are left
        **config,
    }
    return EmbedServer(uvicorn.Config(app, **options), shutdown_grace=settings.shutdown_grace)
