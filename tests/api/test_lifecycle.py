"""Models load in the background: /health answers at once, /ready and the model's requests say 503
(with Retry-After) until it is loaded; a model that fails to load is reported, not fatal."""

from __future__ import annotations

import threading

import httpx

from embedserve.backends.base import Backend
from embedserve.backends.factory import make_backend
from embedserve.errors import ModelLoadError
from embedserve.settings import Settings
from embedserve.spec import ModelSpec
from support import live_server

BODY = {"model": "all-MiniLM-L6-v2", "input": "hello"}


def test_while_loading_health_is_200_and_ready_and_embeddings_are_503() -> None:
    release = threading.Event()

    def slow_backends(spec: ModelSpec, settings: Settings) -> Backend:
        release.wait(60)
        return make_backend(spec, settings)

    with live_server(Settings(), wait_for="/health", backends=slow_backends) as live:
        ready = httpx.get(f"{live.base_url}/ready")
        assert ready.status_code == 503
        assert ready.headers["retry-after"]
        assert ready.json()["error"]["code"] == "model_not_ready"
        assert "all-MiniLM-L6-v2: loading" in ready.json()["error"]["message"]
        early = httpx.post(f"{live.v1}/embeddings", json=BODY)
        assert early.status_code == 503
        assert early.json()["error"]["code"] == "model_not_ready"
        assert early.headers["retry-after"]
        card = httpx.get(f"{live.v1}/models/all-MiniLM-L6-v2").json()
        assert card["status"] == "loading"
        assert card["backend"] is None
        release.set()
        for _ in range(600):
            if httpx.get(f"{live.base_url}/ready").status_code == 200:
                break
            threading.Event().wait(0.1)
        assert httpx.post(f"{live.v1}/embeddings", json=BODY).status_code == 200
        assert httpx.get(f"{live.v1}/models/all-MiniLM-L6-v2").json()["status"] == "ready"


def test_a_model_that_fails_to_load_is_reported_and_the_server_keeps_running() -> None:
    def broken_backends(spec: ModelSpec, settings: Settings) -> Backend:
        raise ModelLoadError("weights are corrupt (simulated)")

    with live_server(Settings(), wait_for="/health", backends=broken_backends) as live:
        for _ in range(600):
            card = httpx.get(f"{live.v1}/models/all-MiniLM-L6-v2").json()
            if card["status"] != "loading":
                break
            threading.Event().wait(0.05)
        assert card["status"] == "failed"
        ready = httpx.get(f"{live.base_url}/ready")
        assert ready.status_code == 503
        assert "failed (weights are corrupt (simulated))" in ready.json()["error"]["message"]
        response = httpx.post(f"{live.v1}/embeddings", json=BODY)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "service_unavailable"
        assert "failed to load" in response.json()["error"]["message"]
        assert httpx.get(f"{live.base_url}/health").status_code == 200
