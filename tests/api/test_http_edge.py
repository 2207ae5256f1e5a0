"""The HTTP edge keeps its promises, on a raw socket: whatever the HTTP parser refuses, and WebSocket
upgrades, get an OpenAI error body with a request id and the connection closes, after the requests
pipelined before them got their own answers; HEAD works wherever GET does; a trailing slash is a 404,
not a redirect; a client that leaves mid-body is a 499, not a 500; and the server serves afterwards."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedserve.logs import RequestIdFilter
from embedserve.settings import Settings
from rawhttp import RawResponse, connect, exchange, read_response, read_until_closed
from support import LiveServer, live_server

MODEL = "all-MiniLM-L6-v2"
EMBED = b'{"model": "all-MiniLM-L6-v2", "input": "hello"}'
POST_EMBED = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(EMBED), EMBED)
TLS_CLIENT_HELLO = bytes.fromhex("16030100f5010000f10303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
WEBSOCKET = (
    b"GET /v1/embeddings HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture(scope="module")
def edge() -> Iterator[LiveServer]:
    with live_server(Settings()) as live:
        yield live


def requests_total(live: LiveServer, **labels: str) -> float:
    text = httpx.get(f"{live.base_url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "embedserve_requests_total" and sample.labels == labels
    )


def assert_refused(response: RawResponse, status: int, code: str) -> str:
    """An OpenAI error with a fresh request id, the connection closed; -> its message."""
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, None)
    message: str = error["message"]
    return message


def assert_still_serving(live: LiveServer) -> None:
    response = httpx.post(f"{live.v1}/embeddings", json={"model": MODEL, "input": "still up"})
    assert response.status_code == 200


# ---- what the HTTP parser refuses -------------------------------------------------------------------

MALFORMED = {
    "bad Content-Length": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n{}",
        "Content-Length",
    ),
    "Content-Length with Transfer-Encoding": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n0\r\n\r\n",
        "Transfer-Encoding",
    ),
    "bad chunk size": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n" + EMBED + b"\r\n0\r\n\r\n",
        "chunk size",
    ),
    "unknown method": (b"FROB /v1/embeddings HTTP/1.1\r\nHost: x\r\n\r\n", "method"),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2"),
    "TLS ClientHello": (TLS_CLIENT_HELLO, "TLS"),
    "control character in a header value": (
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Note: a\x01b\r\n\r\n",
        "header value",
    ),
}


@pytest.mark.parametrize(("sent", "words"), MALFORMED.values(), ids=MALFORMED)
def test_what_the_parser_refuses_is_400_invalid_http_request_and_the_connection_closes(
    edge: LiveServer, sent: bytes, words: str
) -> None:
    before = requests_total(edge, route="-", model="-", status="400")
    (response,) = exchange(edge, sent)  # exchange returns once the server has closed
    assert words in assert_refused(response, 400, "invalid_http_request")
    assert requests_total(edge, route="-", model="-", status="400") == before + 1
    assert_still_serving(edge)


def test_a_refusal_is_logged_with_its_request_id(edge: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="embedserve.server"):
        (response,) = exchange(edge, b"FROB / HTTP/1.1\r\n\r\n")
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "refused"]
    assert getattr(record, "request_id", None) == response.headers["x-request-id"]
    assert (getattr(record, "status", None), getattr(record, "code", None)) == (400, "invalid_http_request")


def test_a_websocket_upgrade_is_400_websocket_not_supported(edge: LiveServer) -> None:
    (response,) = exchange(edge, WEBSOCKET)
    assert "WebSocket" in assert_refused(response, 400, "websocket_not_supported")
    assert_still_serving(edge)


PIPELINED_AFTER = {
    "garbage": (b"GARBAGE\r\n\r\n", 400, "invalid_http_request"),
    "a bad chunk": (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        "invalid_http_request",
    ),
    "a WebSocket upgrade": (WEBSOCKET, 400, "websocket_not_supported"),
    "a head over the limit": (
        b"GET /health HTTP/1.1\r\nX-Padding: " + b"p" * 40_000 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
}


@pytest.mark.parametrize(("bad", "status", "code"), PIPELINED_AFTER.values(), ids=PIPELINED_AFTER)
@pytest.mark.parametrize(
    "valid", [b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", POST_EMBED], ids=["health", "embeddings"]
)
def test_valid_requests_pipelined_before_a_bad_one_get_their_own_answers_first(
    edge: LiveServer, valid: bytes, bad: bytes, status: int, code: str
) -> None:
    first, second, refusal = exchange(edge, valid + valid + bad)
    for answer in (first, second):
        assert answer.status == 200
        assert "connection" not in answer.headers
    if valid == POST_EMBED:
        assert len(first.json()["data"][0]["embedding"]) == 384
    assert_refused(refusal, status, code)
    assert (
        len({first.headers["x-request-id"], second.headers["x-request-id"], refusal.headers["x-request-id"]})
        == 3
    )
    assert_still_serving(edge)


def test_a_request_answered_before_its_body_gets_one_answer_when_the_body_turns_out_malformed(
    server: LiveServer,
) -> None:
    with connect(server) as sock:  # no key: 401 before the body is read
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = read_response(sock)
        sock.sendall(b"zz\r\n" + EMBED + b"\r\n0\r\n\r\n")
        assert read_until_closed(sock) == b""  # no second answer to the same request; closed
    assert answer.status == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"


# ---- HEAD ---------------------------------------------------------------------------------------------

GET_ROUTES = ["/health", "/ready", "/metrics", "/v1/models", f"/v1/models/{MODEL}", "/openapi.json", "/docs"]


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_every_get_route_with_its_headers_and_no_body(edge: LiveServer, path: str) -> None:
    get = httpx.get(edge.base_url + path)
    assert get.status_code == 200
    with connect(edge) as sock:  # HEAD, then GET on the same connection: no body bytes in between
        sock.sendall(b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        head = read_response(sock, head_request=True)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        after = read_response(sock)
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # (its counters move between the two requests)
        assert head.headers["content-length"] == get.headers["content-length"]
    assert int(head.headers["content-length"]) > 0
    assert re.fullmatch(r"[0-9a-f]{32}", head.headers["x-request-id"])
    assert after.status == 200 and after.json()["status"] == "ok"


def test_head_where_get_is_not_served_keeps_its_404_or_405_without_a_body(edge: LiveServer) -> None:
    with connect(edge) as sock:
        for path, status in (("/v1/embeddings", 405), ("/v1/nowhere", 404)):
            sock.sendall(b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
            response = read_response(sock, head_request=True)
            assert response.status == status
            assert response.headers["content-type"] == "application/json"


def test_head_requests_are_counted_under_their_route(edge: LiveServer) -> None:
    before = requests_total(edge, route="/v1/models", model="-", status="200")
    assert httpx.head(f"{edge.v1}/models").status_code == 200
    assert requests_total(edge, route="/v1/models", model="-", status="200") == before + 1


# ---- trailing slashes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/embeddings/"),
        ("GET", "/health/"),
        ("GET", "/ready/"),
        ("GET", "/metrics/"),
        ("GET", "/docs/"),
    ],
)
def test_a_trailing_slash_is_a_404_not_found_not_a_redirect(edge: LiveServer, method: str, path: str) -> None:
    response = httpx.request(method, edge.base_url + path, json={"model": MODEL, "input": "x"})
    assert response.status_code == 404
    assert "location" not in response.headers
    assert response.json()["error"]["code"] == "not_found"
    assert response.headers["x-request-id"]
    assert_still_serving(edge)


# ---- a client that leaves mid-body ------------------------------------------------------------------


def test_a_client_that_leaves_mid_body_is_counted_and_logged_as_499_without_a_traceback(
    edge: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    labels = {"route": "/v1/embeddings", "model": "-"}
    before = {status: requests_total(edge, **labels, status=status) for status in ("499", "500")}
    with caplog.at_level(logging.INFO, logger="embedserve"):
        with connect(edge) as sock:
            sock.sendall(b'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"model": ')
        deadline = time.monotonic() + 10
        while requests_total(edge, **labels, status="499") == before["499"] and time.monotonic() < deadline:
            time.sleep(0.05)
    assert requests_total(edge, **labels, status="499") == before["499"] + 1
    assert requests_total(edge, **labels, status="500") == before["500"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert [r for r in caplog.records if r.name == "embedserve.access" and r.__dict__.get("status") == 499]
    assert_still_serving(edge)
