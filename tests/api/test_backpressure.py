"""Backpressure on a live server with the real model: a full queue answers 503 at once, a client that
leaves takes its queued inputs with it, a request past its deadline gets 503 and its inputs never reach
the model; the server keeps serving after each. The real backend's forward is wrapped in a gate so the
tests decide when a batch may run (it then runs for real)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import orjson

from embedserve.settings import Settings
from gates import ONE, Gate, wait_until
from support import LiveServer, live_server

MODEL = "all-MiniLM-L6-v2"
GUARD_S = 60


def post(live: LiveServer, inputs: list[str]) -> httpx.Response:
    return httpx.post(f"{live.v1}/embeddings", json={"model": MODEL, "input": inputs}, timeout=GUARD_S)


def queued(live: LiveServer) -> int:
    spec = live.state.engine.registry.catalog.resolve(MODEL)
    return live.state.engine.registry.runtime(spec).batcher.queue_depth()


def ids_of(live: LiveServer, text: str) -> list[int]:
    spec = live.state.engine.registry.catalog.resolve(MODEL)
    (ids,) = live.state.engine.registry.runtime(spec).tokenizer.encode_sync([text])
    return ids


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert error["message"]


def test_a_full_queue_answers_503_at_once_and_the_queued_requests_still_complete(
    gate: Gate, pool: ThreadPoolExecutor
) -> None:
    settings = Settings(max_queued_inputs=8, max_inputs_per_request=4, **ONE)
    with live_server(settings, backends=gate.backends()) as live:
        gate.armed = True
        first = pool.submit(post, live, [f"first {i}" for i in range(4)])
        assert gate.entered.wait(GUARD_S)  # its batch is on the model; the queue is empty again
        waiting = [pool.submit(post, live, [f"waiting {r} {i}" for i in range(4)]) for r in range(2)]
        wait_until(lambda: queued(live) == 8, "two requests of 4 inputs are queued")

        refused = post(live, ["one more"])
        assert_error(refused, 503, "server_overloaded")
        assert refused.headers["retry-after"] == "1"
        assert "limit 8" in refused.json()["error"]["message"]
        assert not first.done() and not any(f.done() for f in waiting), "refused without waiting"

        gate.opened.set()
        for future in (first, *waiting):
            response = future.result(GUARD_S)
            assert response.status_code == 200
            assert len(response.json()["data"]) == 4
        assert post(live, ["one more"]).status_code == 200  # recovered
        assert queued(live) == 0


def test_a_client_that_disconnects_takes_its_queued_inputs_with_it(
    gate: Gate, pool: ThreadPoolExecutor
) -> None:
    from test_operations import scrape, value

    with live_server(Settings(**ONE), backends=gate.backends()) as live:
        gate.armed = True
        first = pool.submit(post, live, ["first in line"])
        assert gate.entered.wait(GUARD_S)
        body = orjson.dumps({"model": MODEL, "input": "canary that leaves early"})
        port = int(live.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_until(lambda: queued(live) == 1, "the canary is queued")
        wait_until(
            lambda: (
                value(
                    scrape(live),
                    "embedserve_requests_total",
                    route="/v1/embeddings",
                    model=MODEL,
                    status="499",
                )
                == 1
            ),
            "the server saw the client leave",
        )

        gate.opened.set()
        assert first.result(GUARD_S).status_code == 200
        assert post(live, ["after"]).status_code == 200
        canary = ids_of(live, "canary that leaves early")
        assert canary not in gate.seen, "the departed client's input reached the model"
        assert ids_of(live, "first in line") in gate.seen and ids_of(live, "after") in gate.seen
        assert value(scrape(live), "embedserve_rejected_inputs_total", model=MODEL, reason="cancelled") == 1


def test_a_request_past_its_deadline_gets_503_and_its_queued_inputs_never_run(
    gate: Gate, pool: ThreadPoolExecutor
) -> None:
    with live_server(Settings(request_timeout=1.0, **ONE), backends=gate.backends()) as live:
        gate.armed = True
        first = pool.submit(post, live, ["held on the model"])
        assert gate.entered.wait(GUARD_S)
        late = post(live, ["late canary"])  # queued behind the held batch until its deadline
        assert_error(late, 503, "request_timeout")
        assert late.headers["retry-after"]
        assert "1 s" in late.json()["error"]["message"]
        assert_error(first.result(GUARD_S), 503, "request_timeout")

        gate.opened.set()
        after = post(live, ["after the timeouts"])
        assert after.status_code == 200
        assert np.isclose(np.linalg.norm(after.json()["data"][0]["embedding"]), 1.0, atol=1e-5)
        assert ids_of(live, "late canary") not in gate.seen
