"""HTTP/1.1 on a raw socket, for the tests of the HTTP edge: send exact bytes (pipelined requests,
malformed ones, a head in one write), read what the server sends until it closes, and split that into
its responses."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

from support import LiveServer


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # names lowercased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(live: LiveServer, timeout_s: float = 30) -> socket.socket:
    port = int(live.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout_s)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout if it never does)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket, *, head_request: bool = False) -> RawResponse:
    """Exactly one response from a connection that stays open (`head_request`: it has no body, whatever
    its Content-Length says)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, headers = _head(head)
    length = 0 if head_request else int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection inside a body"
        rest += chunk
    assert len(rest) == length, f"bytes beyond the response: {rest[length:]!r}"
    return RawResponse(status, headers, rest)


def split_responses(raw: bytes) -> list[RawResponse]:
    """The responses in `raw`, each framed by its Content-Length (every response of ours has one)."""
    responses = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"an incomplete response head: {head!r}"
        status, headers = _head(head)
        length = int(headers["content-length"])
        responses.append(RawResponse(status, headers, raw[:length]))
        raw = raw[length:]
    return responses


def exchange(live: LiveServer, data: bytes) -> list[RawResponse]:
    """Send `data` in one write; -> the responses, once the server has closed the connection."""
    with connect(live) as sock:
        sock.sendall(data)
        return split_responses(read_until_closed(sock))


def _head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers
