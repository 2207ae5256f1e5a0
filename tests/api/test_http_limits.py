"""The HTTP server's own limits, on a raw socket: a request head that trickles in (slow-loris) gets 408
and the connection closes; one over the header limit gets 431 and closes, however its bytes arrive (in
pieces, or in one write: one large header, many small ones, a long query string or URL); both bodies
are OpenAI-shaped with a request id, and the server keeps serving."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedserve.settings import Settings
from rawhttp import connect, exchange, read_until_closed, split_responses
from support import LiveServer, live_server

HEADER_TIMEOUT_S = 1.0
MAX_HEADER_BYTES = 4096


@pytest.fixture(scope="module")
def guarded() -> Iterator[LiveServer]:
    settings = Settings(header_timeout=HEADER_TIMEOUT_S, max_header_bytes=MAX_HEADER_BYTES)
    with live_server(settings) as live:
        yield live


def parse(raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    (response,) = split_responses(raw)
    return response.status, response.headers, response.json()


def assert_openai_error(body: dict[str, object], code: str) -> None:
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"


def refused(live: LiveServer, status: int) -> float:
    """embedserve_requests_total of the requests the HTTP layer refused with `status` (route "-")."""
    text = httpx.get(f"{live.base_url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "embedserve_requests_total"
        and sample.labels == {"route": "-", "model": "-", "status": str(status)}
    )


def assert_still_serving(live: LiveServer) -> None:
    response = httpx.post(f"{live.v1}/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "still up"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "sent", [b"", b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-"], ids=["nothing", "half-a-head"]
)
def test_a_request_head_that_never_completes_gets_408_and_the_connection_closes(
    guarded: LiveServer, sent: bytes
) -> None:
    before = refused(guarded, 408)
    with connect(guarded) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        raw = read_until_closed(sock)  # the server closes it; a server without the guard never would
    assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.9
    status, headers, body = parse(raw)
    assert status == 408
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    assert_openai_error(body, "header_timeout")
    # A connection that never sent a byte made no request (a browser's spare connection): not counted.
    assert refused(guarded, 408) == before + (1 if sent else 0)
    assert_still_serving(guarded)


def test_a_slow_loris_trickling_bytes_is_cut_off_at_the_header_timeout(guarded: LiveServer) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(int(HEADER_TIMEOUT_S / 0.1) + 20):  # well past the timeout, one byte at a time
            try:
                sock.sendall(b"X")
            except OSError:
                break  # closed by the server
            time.sleep(0.1)
        raw = read_until_closed(sock)
    status, _, body = parse(raw)
    assert status == 408
    assert_openai_error(body, "header_timeout")
    assert_still_serving(guarded)


def test_headers_over_the_limit_get_431_and_the_connection_closes(guarded: LiveServer) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * (MAX_HEADER_BYTES + 100))
        raw = read_until_closed(sock)
    status, headers, body = parse(raw)
    assert status == 431
    assert headers["connection"] == "close"
    assert_openai_error(body, "headers_too_large")
    assert str(MAX_HEADER_BYTES) in str(body["error"]["message"])  # type: ignore[index]
    assert_still_serving(guarded)


def _head(target: bytes, *headers: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


ONE_READ_HEADS = {  # each a complete head, sent in one write (so it arrives in one read)
    "one large header": _head(b"/health", b"X-Padding: " + b"a" * (MAX_HEADER_BYTES + 1000)),
    "many small headers": _head(
        b"/health", *(b"X-Pad-%03d: " % i + b"b" * 320 for i in range(MAX_HEADER_BYTES // 330 + 2))
    ),
    "a long query string": _head(b"/health?q=" + b"c" * (MAX_HEADER_BYTES + 1000)),
    "a 100 KB URL": _head(b"/" + b"d" * 100_000),
    # Mostly unread when the server answers: closing at once reset the connection, and the 431 was lost.
    "a 1 MB URL": _head(b"/" + b"d" * 1_000_000),
}


@pytest.mark.parametrize("head", ONE_READ_HEADS.values(), ids=ONE_READ_HEADS)
def test_a_head_over_the_limit_in_one_write_gets_431_and_the_connection_closes(
    guarded: LiveServer, head: bytes
) -> None:
    before = refused(guarded, 431)
    (response,) = exchange(guarded, head)  # exchange returns once the server has closed
    assert response.status == 431
    assert response.headers["connection"] == "close"
    assert response.headers["content-type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert_openai_error(response.json(), "headers_too_large")
    assert refused(guarded, 431) == before + 1
    assert_still_serving(guarded)


def test_a_head_begun_behind_another_request_and_finished_in_a_later_read_is_counted_whole(
    guarded: LiveServer,
) -> None:
    with connect(guarded) as sock:
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"  # answered, then the next head begins
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"g" * (MAX_HEADER_BYTES - 200)
        )
        time.sleep(0.3)  # (a read of its own)
        sock.sendall(b"g" * 400 + b"\r\n\r\n")
        first, refusal = split_responses(read_until_closed(sock))
    assert first.status == 200
    assert refusal.status == 431
    assert_openai_error(refusal.json(), "headers_too_large")
    assert_still_serving(guarded)


def test_a_head_just_under_the_limit_in_one_write_is_served(guarded: LiveServer) -> None:
    # The limit counts the URL and the header names and values the parser reports.
    head = _head(b"/health?q=" + b"e" * 1000, b"X-Padding: " + b"f" * (MAX_HEADER_BYTES - 1100))
    with connect(guarded) as sock:
        sock.sendall(head)
        response = sock.recv(65536)
    assert response.startswith(b"HTTP/1.1 200 ")


def test_a_kept_alive_connection_serves_several_requests_under_the_limits(guarded: LiveServer) -> None:
    with httpx.Client(base_url=guarded.base_url) as http:
        for _ in range(3):
            assert http.get("/health", headers={"X-Ok": "b" * 1000}).status_code == 200
        time.sleep(HEADER_TIMEOUT_S * 1.5)  # idle between requests is keep-alive, not a slow head
        assert http.get("/health").status_code == 200


def test_a_large_body_is_not_mistaken_for_large_headers(guarded: LiveServer) -> None:
    text = "word " * 2000  # ~10 KB body, over the header limit, sent with its head in one write
    response = httpx.post(
        f"{guarded.v1}/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [text[:1000]] * 10}
    )
    assert response.status_code == 200
