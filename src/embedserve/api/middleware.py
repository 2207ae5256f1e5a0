"""Outermost ASGI middleware: every request's context and id, the headers a handler asked for, the
drain's refusals, requests in flight, metrics and the access-log line, and the generic 500 for whatever
escaped the routes (design notes 4, 7, 17 and 38)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve.api.context import RequestContext
from embedserve.api.errors import error_body, error_shape, internal_error
from embedserve.api.state import AppState, app_state
from embedserve.errors import EmbedServeError, ShuttingDown
from embedserve.logs import request_id_var

log = logging.getLogger("embedserve.access")

_SANE_ID = re.compile(r"^[\x21-\x7e]{1,200}$")  # visible ASCII, bounded
#: Probes and scrapes: answered while draining, not counted in flight, logged at debug level.
PROBES = frozenset({"/health", "/ready", "/metrics"})
#: Bodies from this size on are followed by a heap trim (AppState.after_large_body).
LARGE_BODY_BYTES = 1 << 20
USER_AGENT_CHARS = 256  # kept of a client's User-Agent in the access line


def pick_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def logged_path(scope: Scope) -> str:
    """The path as the client sent it (percent-escapes kept, no query string): it holds neither a
    space nor a control character, so it can forge no field and no line of the log."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if isinstance(raw, bytes) else str(scope["path"])


def user_agent(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The User-Agent header, bounded (the log formatters escape its control characters)."""
    for name, value in headers:
        if name == b"user-agent":
            text = value.decode("latin-1")  # as ASGI decodes headers
            return text if len(text) <= USER_AGENT_CHARS else text[: USER_AGENT_CHARS - 3] + "..."
    return None


def _quoted(text: str) -> str:
    """For the text line's `user_agent="..."`: a quote inside cannot end the field early."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The matched route's template (bounded, unlike raw paths); for a request refused before routing
    (while draining), the route it would have reached; "unmatched" for unknown paths."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute] = ()) -> None:
        """`routes`: what a request refused before routing (while draining) is counted under."""
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = app_state(scope["app"])
        request_id = pick_request_id(scope["headers"])
        started = time.perf_counter()
        info = RequestContext(request_id=request_id, started=started)
        info.attach(scope)
        token = request_id_var.set(request_id)
        probe = scope["path"] in PROBES
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                extra = info.response_headers  # e.g. a limited key's x-ratelimit-*
                if extra is not None:
                    headers += [
                        (name.encode("latin-1"), value.encode("latin-1")) for name, value in await extra()
                    ]
                if state.draining:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        async def refuse(exc: EmbedServeError) -> None:
            headers = [
                (b"content-type", b"application/json"),
                *((k.lower().encode(), v.encode()) for k, v in exc.headers().items()),
            ]
            await send_with_id({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": error_body(exc, error_shape(scope["path"]))})

        if not probe:
            state.request_started()
        try:
            if state.draining and not probe:
                await refuse(
                    ShuttingDown("The server is shutting down; retry on another replica.", retry_after_s=5)
                )
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], logged_path(scope))
            if status:  # the response has started: nothing sane can be sent any more
                raise
            await refuse(internal_error(request_id))
        finally:
            if not probe:
                state.request_finished()
            if info.body_bytes >= LARGE_BODY_BYTES:
                state.after_large_body()
            self._account(state, scope, info, status, time.perf_counter() - started, probe)
            request_id_var.reset(token)

    def _account(
        self, state: AppState, scope: Scope, info: RequestContext, status: int, seconds: float, probe: bool
    ) -> None:
        route = _route_template(scope, self.routes)
        model = state.engine.catalog.canonical_id(info.model or "") or "-"
        status = status or 499  # no response started: the client left first
        state.metrics.observe_request(route, model, status, seconds)
        level = logging.DEBUG if probe else logging.INFO
        if not log.isEnabledFor(level):  # (--log-level warning: no line, so no fields to build)
            return
        principal = info.principal
        fields = {
            "event": "request",
            "request_id": info.request_id,
            "method": scope["method"],
            "route": route,
            "status": status,
            "latency_ms": round(seconds * 1000, 1),
            "key_id": None if principal is None else principal.key_id,
            "key_prefix": None if principal is None else principal.prefix,
            "model": None if model == "-" else model,
            "inputs": info.inputs,
            "tokens": info.tokens,
            "user_agent": user_agent(scope["headers"]),
        }
        agent = fields["user_agent"]
        log.log(
            level,
            "%s %s %d %.1fms%s%s",
            scope["method"],
            logged_path(scope),
            status,
            seconds * 1000,
            "".join(
                f" {k}={v}"
                for k in ("model", "inputs", "tokens", "key_id", "key_prefix")
                if (v := fields[k]) is not None
            ),
            "" if agent is None else f" user_agent={_quoted(agent)}",
            extra=fields,
        )
