"""schemathesis fuzzes a live server from its own OpenAPI document (schema-valid and invalid requests,
with and without a key): never a 5xx, every error OpenAI-shaped (TEI-shaped on TEI's routes), every
answer one the document lists for its operation (status, media type, body schema, required headers),
and the server healthy afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from embedserve.api.app import create_app
from embedserve.api.errors import TEI_PATHS
from embedserve.catalog import Catalog
from embedserve.settings import Settings
from support import LiveServer, live_server

KEY = "sk-fuzz"
# The server's own OpenAPI document, as /openapi.json serves it (the document does not depend on the
# models, so an app with an empty catalog gives it without loading anything).
schema = schemathesis.openapi.from_dict(create_app(Settings(), Catalog([])).openapi())


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LiveServer]:
    # Small request limits keep every generated request cheap for the real model on 2 CPU cores.
    limits = Settings(
        api_keys=[KEY], max_inputs_per_request=16, max_tokens_per_request=512, max_queued_inputs=64
    )
    with live_server(limits) as live:
        yield live


def test_the_fuzzed_document_is_the_one_the_server_serves(fuzz_server: LiveServer) -> None:
    assert httpx.get(f"{fuzz_server.base_url}/openapi.json").json() == schema.raw_schema


def assert_tei_error(response: Any) -> None:
    """TEI's routes answer TEI's error body (design note 61)."""
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert body["error_type"] in ("validation", "empty", "overloaded", "unhealthy", "backend")


def assert_openai_error(response: Any) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "server_error")
    assert error["param"] is None or isinstance(error["param"], str)
    assert isinstance(error["code"], str)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_5xx_and_every_error_is_openai_shaped(
    case: Any, fuzz_server: LiveServer
) -> None:
    authorized = hash(repr(case.body)) % 5 != 0  # about one request in five comes without a key
    response = case.call(
        base_url=fuzz_server.base_url, headers={"Authorization": f"Bearer {KEY}"} if authorized else {}
    )
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        (assert_tei_error if case.path in TEI_PATHS else assert_openai_error)(response)
    if not authorized and (case.path.startswith("/v1/") or case.path in TEI_PATHS):
        assert response.status_code >= 400  # nothing under /v1/ without a key
        if case.method.upper() == case.operation.method.upper():
            assert response.status_code == 401  # (another method gets 405 before auth runs)
    # The document's promises: the statuses listed per operation are all it answers (so a new error
    # path must be documented), with the listed body schema and required headers (Retry-After on 503).
    case.validate_response(
        response,
        checks=[
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
        ],
    )


def test_after_fuzzing_the_server_is_healthy_and_serves(fuzz_server: LiveServer) -> None:
    assert httpx.get(f"{fuzz_server.base_url}/ready").status_code == 200
    response = httpx.post(
        f"{fuzz_server.v1}/embeddings",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "all-MiniLM-L6-v2", "input": ["after the fuzzing"]},
    )
    assert response.status_code == 200
    assert len(response.json()["data"][0]["embedding"]) == 384
    assert fuzz_server.state.in_flight == 0
