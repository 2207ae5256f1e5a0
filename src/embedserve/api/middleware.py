"""Outermost ASGI middleware: gives every request an id (the client's X-Request-ID when it is sane),
puts it on every response and every log line, adds the headers a handler asked for on whatever response
goes out (`scope["state"]["response_headers"]`, a callable: a limited key's x-ratelimit-*), writes the
access log line, and turns any exception that escaped the routes into the generic 500 error (traceback
in the log only). It also notes when the request started, for the usage record's latency."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve.api.errors import error_body, internal_error
from embedserve.logs import request_id_var

log = logging.getLogger("embedserve.access")

_SANE_ID = re.compile(r"^[\x21-\x7e]{1,200}$")  # visible ASCII, bounded


def pick_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = pick_request_id(scope["headers"])
        started = time.perf_counter()
        scope.setdefault("state", {}).update(request_id=request_id, started=time.monotonic())
        token = request_id_var.set(request_id)
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                extra = scope["state"].get("response_headers")  # e.g. a limited key's x-ratelimit-*
                if extra is not None:
                    headers += [(name.encode("latin-1"), value.encode("latin-1"))
                                for name, value in extra()]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if status:  # the response has started: nothing sane can be sent any more
                raise
            exc = internal_error(request_id)
            await send_with_id({"type": "http.response.start", "status": exc.status,
                                "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": error_body(exc)})
        finally:
            principal = scope["state"].get("principal")
            who = "" if principal is None else f" key={principal.key_id}" + (
                f" ({principal.prefix}...)" if principal.prefix else "")
            log.info("%s %s %d %.1fms%s", scope["method"], scope["path"], status,
                     (time.perf_counter() - started) * 1000, who)
            request_id_var.reset(token)
