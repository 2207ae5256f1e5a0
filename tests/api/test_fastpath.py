"""The fast path in front of FastAPI: exactly POST /v1/embeddings goes straight to its handler (the one
FastAPI would call), with the route set for the access log and metrics; every other request goes on
through FastAPI; the handler's errors are answered by the one translator."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from embedserve.api.app import create_app
from embedserve.api.context import RequestContext
from embedserve.api.fastpath import EmbeddingsFastPath
from embedserve.api.head import HeadAsGet
from embedserve.api.middleware import RequestContextMiddleware
from embedserve.api.routes import EMBEDDINGS_PATH, create_embeddings
from embedserve.catalog import Catalog
from embedserve.errors import InternalError, InvalidRequest, ModelNotReady
from embedserve.settings import Settings

#: The route the fast path stands in for, as an app built by create_app has it.
ROUTE = next(
    m.kwargs["route"]
    for m in create_app(Settings(), Catalog([])).user_middleware
    if m.cls is EmbeddingsFastPath
)


class Recorder:
    """The app behind the fast path (FastAPI, in the server): records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen.append((scope["method"], scope["path"]))
        await Response(b"behind")(scope, receive, send)


def serve(fast: EmbeddingsFastPath, method: str, path: str) -> httpx.Response:
    async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
        RequestContext(request_id="req-7", started=0.0).attach(scope)  # as RequestContextMiddleware does
        await fast(scope, receive, send)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=with_state, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.request(method, path, content=b"{}")

    return asyncio.run(call())


def test_post_to_the_embeddings_path_goes_to_the_handler_with_its_route_set() -> None:
    behind = Recorder()
    routes: list[Any] = []

    async def handler(request: Request) -> Response:
        routes.append(request.scope["route"])
        return Response(b"fast", media_type="application/json")

    response = serve(EmbeddingsFastPath(behind, ROUTE, handler=handler), "POST", "/v1/embeddings?x=1")
    assert response.status_code == 200 and response.content == b"fast"
    assert behind.seen == []
    assert [route.path for route in routes] == [EMBEDDINGS_PATH]
    assert "POST" in routes[0].methods


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/embeddings"),  # FastAPI answers 405
        ("PUT", "/v1/embeddings"),
        ("POST", "/v1/embeddings/"),  # FastAPI's redirect
        ("POST", "/v1/embeddingsX"),
        ("POST", "/v1/models"),
        ("GET", "/health"),
    ],
)
def test_everything_else_goes_on_through_fastapi(method: str, path: str) -> None:
    behind = Recorder()

    async def handler(request: Request) -> Response:
        raise AssertionError("the fast path took a request it must leave alone")

    response = serve(EmbeddingsFastPath(behind, ROUTE, handler=handler), method, path)
    assert response.content == b"behind"
    assert behind.seen == [(method, path)]


def test_the_handlers_errors_are_openai_errors() -> None:
    async def invalid(request: Request) -> Response:
        raise InvalidRequest("bad dimensions", param="dimensions")

    response = serve(EmbeddingsFastPath(Recorder(), ROUTE, handler=invalid), "POST", EMBEDDINGS_PATH)
    assert response.status_code == 400
    assert orjson.loads(response.content) == {
        "error": {
            "message": "bad dimensions",
            "type": "invalid_request_error",
            "param": "dimensions",
            "code": "invalid_value",
        }
    }


def test_a_come_back_later_keeps_its_retry_after() -> None:
    async def loading(request: Request) -> Response:
        raise ModelNotReady("still loading", retry_after_s=2)

    response = serve(EmbeddingsFastPath(Recorder(), ROUTE, handler=loading), "POST", EMBEDDINGS_PATH)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert orjson.loads(response.content)["error"]["code"] == "model_not_ready"


def test_a_fault_of_ours_is_the_generic_500_with_the_request_id() -> None:
    async def broken(request: Request) -> Response:
        raise InternalError("secret detail of the fault")

    response = serve(EmbeddingsFastPath(Recorder(), ROUTE, handler=broken), "POST", EMBEDDINGS_PATH)
    assert response.status_code == 500
    error = orjson.loads(response.content)["error"]
    assert error["code"] == "internal_error" and "req-7" in error["message"]
    assert "secret detail" not in response.text


def test_other_exceptions_propagate_to_the_request_context_middleware() -> None:
    async def crash(request: Request) -> Response:
        raise RuntimeError("unexpected")

    with pytest.raises(RuntimeError, match="unexpected"):
        serve(EmbeddingsFastPath(Recorder(), ROUTE, handler=crash), "POST", EMBEDDINGS_PATH)


def test_the_app_puts_the_fast_path_inside_the_request_context() -> None:
    """Request ids, draining, accounting and the generic 500 wrap the fast path too; by default it
    serves the handler FastAPI documents. HEAD handling sits inside it: POST /v1/embeddings never meets
    it."""
    app = create_app(Settings(), Catalog([]))
    assert [m.cls for m in app.user_middleware] == [RequestContextMiddleware, EmbeddingsFastPath, HeadAsGet]
    assert EmbeddingsFastPath(Recorder(), ROUTE).handler is create_embeddings
    assert EMBEDDINGS_PATH in app.openapi()["paths"]
