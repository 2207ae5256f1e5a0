"""A real `embedserve serve` process, in text and in JSON log format, gets requests built to forge log
records: a path whose percent-escapes decode to LF, CR LF, NUL or an ANSI escape followed by a whole
forged access record (no key needed: a 404), the same in `/v1/models/{id}`, in a model name, and a
User-Agent of C1 controls (NEL, 8-bit CSI) and TAB. Its log keeps one record per line (text: a record's
further lines are indented), no line begins with the forged record, no raw control character is written,
and the access lines show the path as sent and the escaped user agent."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from embedserve.cli.serve import banner
from embedserve.logs import CONTINUATION
from embedserve.settings import Settings
from support import free_port, wait_until_ok

MODEL = "all-MiniLM-L6-v2"
SECRET = "sk-forging-secret-91d2"
FORGED = "2026-12-01 07:00:00,000 INFO embedserve.access [forged] DELETE /v1/keys/key_1 200 1.0ms"
FORGED_URL = FORGED.replace(" ", "%20")
#: (request id, raw request path, key or not, expected status)
PATHS = [
    ("forge-lf", f"/x%0a{FORGED_URL}", False, 404),  # the request, as sent
    ("forge-crlf", f"/x%0d%0a{FORGED_URL}", False, 404),
    ("forge-nul", f"/x%00%0a{FORGED_URL}", False, 404),
    ("forge-ansi", f"/x%1b[2K%1b%5b31m%0d{FORGED_URL}", False, 404),
    ("forge-model", f"/v1/models/{MODEL}%0d%0a{FORGED_URL}", True, 404),
]
AGENT = b"curl/8.5\x9b2K\x85" + FORGED.encode() + b"\t\xe2\x80\xa8end"  # (an obs-text UTF-8 U+2028)
AGENT_ESCAPED = "curl/8.5\\x9b2K\\x85" + FORGED + "\\t\xe2\\x80\xa8end"
RECORD_START = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ "
    r"\[[^\]\s]*\] "
)
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@dataclass
class Run:
    fmt: str
    port: int
    stderr: str = ""
    statuses: dict[str, int] | None = None


def send_raw(port: int, head: bytes, body: bytes = b"") -> int:
    """One request on its own connection, exactly these bytes; -> the response's status."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def head(method: str, path: str, request_id: bytes, *headers: bytes) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1".encode(),
        b"Host: x",
        b"Connection: close",
        b"X-Request-ID: " + request_id,
        *headers,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def requests(port: int) -> dict[str, int]:
    """-> request id: the status each request got."""
    key = f"Authorization: Bearer {SECRET}".encode()
    statuses = {}
    for request_id, path, keyed, _ in PATHS:
        auth = (key,) if keyed else ()
        statuses[request_id] = send_raw(port, head("GET", path, request_id.encode(), *auth))
    statuses["forge-agent"] = send_raw(
        port, head("GET", "/v1/models", b"forge-agent", key, b"User-Agent: " + AGENT)
    )
    body = json.dumps({"model": f"x\r\n{FORGED}\x1b[2K", "input": "y"}).encode()
    statuses["forge-body"] = send_raw(
        port,
        head(
            "POST",
            "/v1/embeddings",
            b"forge-body",
            key,
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
        ),
        body,
    )
    # not a sane id (a C1 control in it): replaced by a fresh one
    statuses["insane-id"] = send_raw(port, head("GET", "/health", b"id\x85" + FORGED.encode()))
    return statuses


@pytest.fixture(scope="module", params=["text", "json"])
def run(request: pytest.FixtureRequest) -> Run:
    result = Run(fmt=request.param, port=free_port())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedserve",
            "serve",
            "--port",
            str(result.port),
            "--api-key",
            SECRET,
            "--log-format",
            result.fmt,
            "--log-level",
            "debug",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "EMBEDSERVE_API_KEYS": ""},
        encoding="utf-8",
        errors="surrogateescape",
    )
    try:
        wait_until_ok(f"http://127.0.0.1:{result.port}/ready", alive=lambda: proc.poll() is None)
        result.statuses = requests(result.port)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, result.stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, result.stderr[-3000:]
    return result


def log_lines(run: Run) -> list[str]:
    """The log, less the start-up banner that `serve` prints for people in text format."""
    text = run.stderr
    if run.fmt == "text":
        shown = banner(Settings(port=run.port), MODEL, open_server=False) + "\n"
        assert text.count(shown) == 1
        text = text.replace(shown, "")
    assert text.splitlines() == text.rstrip("\n").split("\n")  # no line break but LF
    return text.rstrip("\n").split("\n")


def test_the_requests_were_answered_as_usual(run: Run) -> None:
    assert run.statuses == {
        **{request_id: status for request_id, _, _, status in PATHS},
        "forge-agent": 200,
        "forge-body": 404,
        "insane-id": 200,
    }


def test_every_line_is_one_record_and_none_begins_with_the_forged_one(run: Run) -> None:
    lines = log_lines(run)
    assert len(lines) > 10
    for line in lines:
        assert not line.startswith(FORGED[:23]), line
        if run.fmt == "json":
            record = json.loads(line)
            assert {"ts", "level", "logger", "request_id", "message"} <= set(record)
        else:
            assert RECORD_START.match(line) or line.startswith(CONTINUATION), line


def test_no_raw_control_character_reaches_the_log(run: Run) -> None:
    assert not UNSAFE.search(run.stderr), UNSAFE.findall(run.stderr)
    if run.fmt == "json":
        for line in log_lines(run):
            for value in json.loads(line).values():
                assert not (isinstance(value, str) and UNSAFE.search(value.replace("\n", ""))), value


def access(run: Run) -> dict[str, Any]:
    """request id -> its access line (the JSON object, or the text line)."""
    out: dict[str, Any] = {}
    for line in log_lines(run):
        if run.fmt == "json":
            record = json.loads(line)
            if record.get("event") == "request":
                out[record["request_id"]] = record
        elif " embedserve.access [" in line:
            out[line.split("[", 1)[1].split("]", 1)[0]] = line
    return out


def test_access_lines_show_the_path_as_sent_and_the_escaped_user_agent(run: Run) -> None:
    lines = access(run)
    for request_id, path, _, status in PATHS:
        line = lines[request_id]
        message = line["message"] if run.fmt == "json" else line.split("] ", 1)[1]
        assert message.startswith(f"GET {path} {status} "), message
    agent = lines["forge-agent"]
    if run.fmt == "json":
        assert agent["user_agent"] == AGENT_ESCAPED
        assert agent["status"] == 200 and agent["route"] == "/v1/models"
    else:
        assert agent.endswith(f' user_agent="{AGENT_ESCAPED}"')
    assert FORGED not in str(lines["forge-body"])  # a model name is never logged as sent
    assert "forge-agent" in lines and not any("\x85" in request_id for request_id in lines)
