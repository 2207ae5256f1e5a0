"""A real `embedserve serve` process with JSON logs gets SIGTERM while requests are in flight: /ready
turns 503 and new requests get 503 at once, every request accepted before the signal gets its full,
correct answer, and the process exits 0. Its log is one JSON object per line, with the start-up and
access fields an operator needs and never an input text or a key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from embedserve.postprocess import min_cosine
from support import free_port, wait_until_ok

MODEL = "all-MiniLM-L6-v2"
SECRET = "sk-drain-secret-5c1e"
CANARY = "okapi-canary-4411"
IN_FLIGHT = 4
TEXTS_PER_REQUEST = 48
WORDS = (
    "river",
    "quantum",
    "ledger",
    "harbor",
    "violet",
    "compile",
    "meadow",
    "signal",
    "granite",
    "orbit",
    "lantern",
    "syntax",
    "tundra",
    "mosaic",
    "falcon",
    "protocol",
    "ember",
    "vector",
)


def texts_for(request: int) -> list[str]:
    """Long, varied, deterministic inputs (about 150-200 tokens each): seconds of work per request."""
    return [
        CANARY + " " + " ".join(WORDS[(request * 7 + i * 3 + j * j) % len(WORDS)] for j in range(160))
        for i in range(TEXTS_PER_REQUEST)
    ]


@dataclass
class Run:
    port: int
    returncode: int | None = None
    stderr: str = ""
    in_flight: list[httpx.Response | BaseException] = field(default_factory=list)
    ready_after_signal: httpx.Response | None = None
    new_after_signal: httpx.Response | None = None
    health_after_signal: httpx.Response | None = None


def _in_flight_gauge(base: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("embedserve_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


@pytest.fixture(scope="module")
def drained() -> Run:
    run = Run(port=free_port())
    base = f"http://127.0.0.1:{run.port}"
    env = {**os.environ, "EMBEDSERVE_API_KEYS": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedserve",
            "serve",
            "--port",
            str(run.port),
            "--api-key",
            SECRET,
            "--log-format",
            "json",
            "--shutdown-grace",
            "120",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    auth = {"Authorization": f"Bearer {SECRET}"}
    results: dict[int, httpx.Response | BaseException] = {}

    def send(i: int) -> None:
        try:
            results[i] = httpx.post(
                f"{base}/v1/embeddings",
                headers={**auth, "X-Request-ID": f"drain-{i}"},
                json={"model": MODEL, "input": texts_for(i)},
                timeout=300,
            )
        except BaseException as exc:  # reported by the tests, not lost in a thread
            results[i] = exc

    try:
        wait_until_ok(f"{base}/ready", alive=lambda: proc.poll() is None)
        threads = [threading.Thread(target=send, args=(i,)) for i in range(IN_FLIGHT)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while _in_flight_gauge(base) < IN_FLIGHT:
            assert time.monotonic() < deadline, "the requests never got in flight"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # the signal is handled between two event-loop steps
        run.ready_after_signal = httpx.get(f"{base}/ready")
        run.new_after_signal = httpx.post(
            f"{base}/v1/embeddings", headers=auth, json={"model": MODEL, "input": "too late"}
        )
        run.health_after_signal = httpx.get(f"{base}/health")
        for thread in threads:
            thread.join(300)
        run.in_flight = [results[i] for i in range(IN_FLIGHT)]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, run.stderr = proc.communicate(timeout=120)
        run.returncode = proc.returncode
    return run


def test_ready_turns_503_and_new_requests_are_refused_while_draining(drained: Run) -> None:
    assert drained.ready_after_signal is not None and drained.new_after_signal is not None
    for response in (drained.ready_after_signal, drained.new_after_signal):
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "shutting_down"
        assert response.json()["error"]["type"] == "server_error"
        assert response.headers["retry-after"]
    assert drained.new_after_signal.headers["connection"] == "close"
    assert drained.health_after_signal is not None and drained.health_after_signal.status_code == 200


def test_every_request_in_flight_at_the_signal_gets_its_full_correct_answer(
    drained: Run, st_model: Any
) -> None:
    for i, response in enumerate(drained.in_flight):
        assert isinstance(response, httpx.Response), response
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [d["index"] for d in data] == list(range(TEXTS_PER_REQUEST))
        got = np.array([d["embedding"] for d in data], dtype=np.float32)
        want = st_model.encode(texts_for(i), normalize_embeddings=True)
        assert min_cosine(got, want) >= 0.9999


def test_the_process_exits_0_after_the_drain(drained: Run) -> None:
    assert drained.returncode == 0, drained.stderr[-3000:]
    assert "Traceback" not in drained.stderr


def _lines(run: Run) -> list[dict[str, Any]]:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return parsed


def test_every_log_line_is_one_json_object(drained: Run) -> None:
    lines = _lines(drained)
    assert lines
    for line in lines:
        assert {"ts", "level", "logger", "request_id", "message"} <= set(line)


def test_the_start_up_line_names_the_model_and_how_it_is_served(drained: Run) -> None:
    (ready,) = [line for line in _lines(drained) if line.get("event") == "model_ready"]
    assert ready["model"] == MODEL
    assert ready["dimensions"] == 384
    assert ready["max_input_tokens"] == 256
    assert (ready["backend"], ready["device"], ready["precision"]) == ("onnx", "cpu", "float32")
    assert ready["load_seconds"] > 0


def test_access_lines_carry_the_request_fields(drained: Run) -> None:
    access = {line["request_id"]: line for line in _lines(drained) if line.get("event") == "request"}
    for i, response in enumerate(drained.in_flight):
        assert isinstance(response, httpx.Response)
        line = access[f"drain-{i}"]
        assert line["status"] == 200
        assert line["route"] == "/v1/embeddings"
        assert line["model"] == MODEL
        assert line["inputs"] == TEXTS_PER_REQUEST
        assert line["tokens"] == response.json()["usage"]["prompt_tokens"]
        assert line["key_id"] and SECRET not in line["key_id"]
        assert line["latency_ms"] > 0
    assert len({access[f"drain-{i}"]["key_id"] for i in range(IN_FLIGHT)}) == 1  # one key, one id
    refused = [line for line in access.values() if line["status"] == 503]
    assert any(line["route"] == "/v1/embeddings" for line in refused)
    assert any(line.get("event") == "draining" for line in _lines(drained))


def test_the_log_never_holds_an_input_text_or_a_key(drained: Run) -> None:
    assert CANARY not in drained.stderr
    assert SECRET not in drained.stderr
