"""Everything around the embeddings call: auth, request ids, routing errors, model listing, health,
unexpected failures (500 without a traceback), and concurrent requests without cross-talk."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from conftest import API_KEY, MRL_DIMS, OTHER_KEY
from embedserve.backends.fake import fake_backends
from embedserve.logs import RequestIdFilter
from embedserve.settings import Settings
from gates import Gate
from support import LiveServer, live_server

MODEL = "all-MiniLM-L6-v2"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    error: dict[str, Any] = body["error"]
    return error


# ---- auth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": API_KEY},
    ],
    ids=["missing", "wrong", "not bearer", "empty bearer", "no scheme"],
)
@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}")]
)
def test_missing_or_wrong_key_is_401_invalid_api_key(
    server: LiveServer, headers: dict[str, str], method: str, path: str
) -> None:
    response = httpx.request(
        method, server.base_url + path, headers=headers, json={"model": MODEL, "input": "x"}
    )
    assert response.status_code == 401
    error = error_of(response)
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert API_KEY not in response.text


def test_every_configured_key_is_accepted(server: LiveServer) -> None:
    for key in (API_KEY, OTHER_KEY):
        sdk = OpenAI(base_url=server.v1, api_key=key, max_retries=0)
        assert len(sdk.embeddings.create(model=MODEL, input="x").data) == 1


def test_sdk_with_a_wrong_key_raises_authentication_error(server: LiveServer) -> None:
    sdk = OpenAI(base_url=server.v1, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk.embeddings.create(model=MODEL, input="x")
    assert caught.value.code == "invalid_api_key"


def test_health_and_ready_need_no_key_and_detail_the_ledger_and_the_key_store(server: LiveServer) -> None:
    health = httpx.get(f"{server.base_url}/health").json()
    ready = httpx.get(f"{server.base_url}/ready").json()
    assert health["status"] == "ok" and ready["status"] == "ready"
    for body in (health, ready):
        ledger, keys = body["checks"]["ledger"], body["checks"]["keys"]
        assert set(ledger) == {"status", "pending_records", "write_failures", "last_write"}
        assert (ledger["status"], ledger["write_failures"]) == ("ok", 0)
        assert ledger["pending_records"] >= 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", ledger["last_write"])
        assert set(keys) == {"status", "refresh_failures", "last_refresh"}
        assert (keys["status"], keys["refresh_failures"]) == ("ok", 0)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", keys["last_refresh"])


# ---- request ids ------------------------------------------------------------------------------------


def test_request_id_is_echoed_on_success_and_error(server: LiveServer) -> None:
    ok = httpx.post(
        f"{server.v1}/embeddings",
        json={"model": MODEL, "input": "x"},
        headers={**AUTH, "X-Request-ID": "trace-123"},
    )
    bad = httpx.post(
        f"{server.v1}/embeddings",
        json={"model": MODEL, "input": ""},
        headers={**AUTH, "X-Request-ID": "trace-456"},
    )
    unauthorized = httpx.get(f"{server.v1}/models", headers={"X-Request-ID": "trace-789"})
    assert ok.headers["x-request-id"] == "trace-123"
    assert bad.headers["x-request-id"] == "trace-456"
    assert unauthorized.headers["x-request-id"] == "trace-789"


def test_request_id_is_generated_when_absent_or_unusable(server: LiveServer) -> None:
    first = httpx.get(f"{server.base_url}/health")
    second = httpx.get(f"{server.base_url}/health", headers={"X-Request-ID": "x" * 500})
    for response in (first, second):
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_log_lines_of_a_request_carry_its_id(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(RequestIdFilter())

    def ours() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "embedserve.access" and "POST /v1/embeddings" in r.getMessage()
        ]

    with caplog.at_level(logging.INFO, logger="embedserve"):
        httpx.post(
            f"{server.v1}/embeddings",
            json={"model": MODEL, "input": "x"},
            headers={**AUTH, "X-Request-ID": "log-trace-1"},
        )
        deadline = time.monotonic() + 5  # the access line is written after the response is sent
        while not ours() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert ours()
    assert all(getattr(r, "request_id", None) == "log-trace-1" for r in ours())


# ---- routing errors are OpenAI errors too -----------------------------------------------------------


def test_unknown_route_is_404_openai_error(server: LiveServer) -> None:
    response = httpx.post(f"{server.v1}/completions", json={}, headers=AUTH)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"
    assert response.headers["x-request-id"]


def test_wrong_method_is_405_openai_error(server: LiveServer) -> None:
    response = httpx.get(f"{server.v1}/embeddings", headers=AUTH)
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"


# ---- models -----------------------------------------------------------------------------------------


def test_models_list_has_openai_shape_and_extensions(server: LiveServer, client: OpenAI) -> None:
    listed = httpx.get(f"{server.v1}/models", headers=AUTH).json()
    assert listed["object"] == "list"
    cards = {card["id"]: card for card in listed["data"]}
    assert set(cards) == {MODEL, "minilm-mrl", "minilm-prompted", "tiny-cls-dense"}
    card = cards[MODEL]
    assert card["object"] == "model" and isinstance(card["created"], int)
    assert card["owned_by"] == "sentence-transformers"
    assert cards["tiny-cls-dense"]["owned_by"] == "local"
    assert card["supports"] == ["embeddings"]
    assert card["dimensions"] == 384 and card["max_input_tokens"] == 256
    assert card["matryoshka_dimensions"] == []
    assert card["aliases"] == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert card["status"] == "ready"
    assert cards["minilm-mrl"]["matryoshka_dimensions"] == list(MRL_DIMS)
    assert cards["tiny-cls-dense"]["dimensions"] == 16
    assert {m.id for m in client.models.list()} == set(cards)


def test_model_retrieve_by_id_and_by_alias_with_a_slash(client: OpenAI) -> None:
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve("sentence-transformers/all-MiniLM-L6-v2").id == MODEL


def test_model_retrieve_unknown_is_404_model_not_found(server: LiveServer) -> None:
    response = httpx.get(f"{server.v1}/models/no-such-model", headers=AUTH)
    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"


def test_a_one_megabyte_model_name_gets_a_short_404_listing_the_models(server: LiveServer) -> None:
    response = httpx.post(
        f"{server.v1}/embeddings", json={"model": "z" * 2**20, "input": "x"}, headers=AUTH, timeout=60
    )
    assert response.status_code == 404
    assert len(response.content) < 1024
    error = error_of(response)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'" + "z" * 64 + "...'" in error["message"]
    assert f"Models you may use: {MODEL}, minilm-mrl, minilm-prompted, tiny-cls-dense." in error["message"]
    assert (
        httpx.post(f"{server.v1}/embeddings", json={"model": MODEL, "input": "x"}, headers=AUTH).status_code
        == 200
    )


@pytest.mark.parametrize("model_id", ["%0A0", "a%0Ab", "%0D%0A", "x%0A"])
def test_model_ids_with_control_characters_reach_the_route(server: LiveServer, model_id: str) -> None:
    # Found by the fuzzer: a newline escaped the route's pattern, so these were 404 before auth.
    response = httpx.get(f"{server.v1}/models/{model_id}")
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"
    response = httpx.get(f"{server.v1}/models/{model_id}", headers=AUTH)
    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"


def test_openapi_document_describes_the_embeddings_route(server: LiveServer) -> None:
    doc = httpx.get(f"{server.base_url}/openapi.json").json()
    post = doc["paths"]["/v1/embeddings"]["post"]
    assert "requestBody" in post and "400" in post["responses"]


# ---- failures of ours: 500, generic message, request id, no traceback; then still serving ----------


@pytest.fixture(scope="module")
def faulty() -> Iterator[tuple[LiveServer, Gate]]:
    """The whole app on fake backends whose forward passes fail while the gate's `failure` is set."""
    gate = Gate()
    with live_server(Settings(api_keys=[API_KEY]), backends=gate.backends(fake_backends())) as live:
        yield live, gate


def test_unexpected_exception_is_500_with_request_id_and_no_traceback(
    faulty: tuple[LiveServer, Gate],
) -> None:
    live, gate = faulty
    gate.failure = RuntimeError("secret internal detail")
    try:
        response = httpx.post(
            f"{live.v1}/embeddings",
            json={"model": MODEL, "input": "x"},
            headers={**AUTH, "X-Request-ID": "boom-1"},
        )
    finally:
        gate.failure = None
    assert response.status_code == 500
    error = error_of(response)
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "boom-1" in error["message"]
    assert "secret internal detail" not in response.text
    assert response.headers["x-request-id"] == "boom-1"
    assert (
        httpx.post(f"{live.v1}/embeddings", json={"model": MODEL, "input": "x"}, headers=AUTH).status_code
        == 200
    )


def test_failing_forward_passes_are_500_and_the_batcher_keeps_serving(
    faulty: tuple[LiveServer, Gate], pool: ThreadPoolExecutor
) -> None:
    live, gate = faulty
    gate.failure = RuntimeError("CUDA error: device-side assert (simulated)")
    try:
        failed = list(
            pool.map(
                lambda i: httpx.post(
                    f"{live.v1}/embeddings", json={"model": MODEL, "input": [f"t{i}"] * 3}, headers=AUTH
                ),
                range(8),
            )
        )
    finally:
        gate.failure = None
    assert [r.status_code for r in failed] == [500] * 8
    assert all("simulated" not in r.text and error_of(r)["code"] == "internal_error" for r in failed)
    after = httpx.post(f"{live.v1}/embeddings", json={"model": MODEL, "input": ["a", "b"]}, headers=AUTH)
    assert after.status_code == 200 and len(after.json()["data"]) == 2


# ---- concurrency: items of many requests share batches, each gets its own vectors -------------------


def test_concurrent_requests_get_their_own_vectors(server: LiveServer, st_model: Any) -> None:
    singles = [f"request number {i}: " + "lorem ipsum " * (i % 7) for i in range(16)]
    bulk = [f"bulk text {i}" + " amet" * (i % 4) for i in range(2048)]  # under the token total

    async def run() -> tuple[list[Any], Any]:
        async with httpx.AsyncClient(headers=AUTH, timeout=300) as http:
            big = http.post(
                f"{server.v1}/embeddings", json={"model": MODEL, "input": bulk, "encoding_format": "base64"}
            )
            small = [
                http.post(f"{server.v1}/embeddings", json={"model": MODEL, "input": text}) for text in singles
            ]
            *answers, big_answer = await asyncio.gather(*small, big)
            return answers, big_answer

    answers, big_answer = asyncio.run(run())
    expected = st_model.encode(singles, normalize_embeddings=True)
    for answer, want in zip(answers, expected, strict=True):
        assert answer.status_code == 200
        got = np.asarray(answer.json()["data"][0]["embedding"])
        assert float(got @ want) >= 0.9999
    import base64

    bulk_expected = st_model.encode(bulk, normalize_embeddings=True, batch_size=256)
    data = big_answer.json()["data"]
    got_bulk = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
    cosines = np.sum(got_bulk * bulk_expected, axis=1)
    assert cosines.min() >= 0.9999
