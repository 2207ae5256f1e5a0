"""The OpenAPI document: the Bearer scheme on exactly the routes that need a key (checked against the live
server), each route's real error answers with OpenAI's error schema, and no 422 anywhere."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from conftest import API_KEY
from embedserve.api.app import create_app
from embedserve.api.errors import TEI_PATHS
from embedserve.api.middleware import PROBES
from embedserve.api.openapi import BEARER, error_responses, finish_document, with_subclasses
from embedserve.catalog import Catalog
from embedserve.errors import EmbedServeError, InvalidRequest, ServiceUnavailable
from embedserve.settings import Settings
from support import LiveServer

KEYED = {
    ("post", "/v1/embeddings"),
    ("post", "/embed_sparse"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{model_id}"),
    ("get", "/v1/keys"),
    ("post", "/v1/keys"),
    ("get", "/v1/keys/{key_id}"),
    ("patch", "/v1/keys/{key_id}"),
    ("delete", "/v1/keys/{key_id}"),
    ("get", "/v1/usage"),
    ("post", "/v1/files"),
    ("get", "/v1/files"),
    ("get", "/v1/files/{file_id}"),
    ("get", "/v1/files/{file_id}/content"),
    ("delete", "/v1/files/{file_id}"),
    ("post", "/v1/batches"),
    ("get", "/v1/batches"),
    ("get", "/v1/batches/{batch_id}"),
    ("post", "/v1/batches/{batch_id}/cancel"),
}
PUBLIC = {("get", "/health"), ("get", "/ready"), ("get", "/metrics")}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
#: TEI's routes answer TEI's error body (api.errors.TEI_PATHS).
TEI_ERROR_REF = {"$ref": "#/components/schemas/TEIErrorResponse"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    doc: dict[str, Any] = create_app(Settings(), Catalog([])).openapi()
    return doc


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op for path, ops in document["paths"].items() for method, op in ops.items()}


def test_document_declares_an_http_bearer_scheme(document: dict[str, Any]) -> None:
    scheme = document["components"]["securitySchemes"][BEARER]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"


def test_the_scheme_applies_to_every_keyed_route_and_to_no_public_one(document: dict[str, Any]) -> None:
    ops = operations(document)
    assert set(ops) == KEYED | PUBLIC
    for key in KEYED:
        assert ops[key]["security"] == [{BEARER: []}], key
    for key in PUBLIC:
        assert "security" not in ops[key], key
    assert "security" not in document  # no document-wide default that would cover the probes


def test_the_document_mentions_no_422_and_no_validation_error_schema(document: dict[str, Any]) -> None:
    text = json.dumps({"paths": document["paths"], "components": document["components"]})
    assert "422" not in text
    assert "HTTPValidationError" not in text and '"ValidationError"' not in text
    for op in operations(document).values():
        assert all(400 <= int(status) < 600 or int(status) in (200, 201) for status in op["responses"])


def test_every_error_answer_is_the_error_schema_as_json_with_its_codes(document: dict[str, Any]) -> None:
    codes = {cls.code for cls in with_subclasses(EmbedServeError) if cls.code}
    for key, op in operations(document).items():
        errors = {status: r for status, r in op["responses"].items() if int(status) >= 400}
        assert "500" in errors, key  # a bug's generic 500, on every route
        for status, response in errors.items():
            schema = TEI_ERROR_REF if key[1] in TEI_PATHS else ERROR_REF
            assert response["content"] == {"application/json": {"schema": schema}}, (key, status)
            listed = [c.strip("` ") for c in response["description"].split(":", 1)[1].split(",")]
            assert listed and set(listed) <= codes, (key, status, listed)


@pytest.mark.parametrize(
    ("key", "statuses"),
    [
        (("post", "/v1/embeddings"), {"200", "400", "401", "404", "413", "429", "500", "503"}),
        (("post", "/embed_sparse"), {"200", "400", "401", "404", "413", "429", "500", "503"}),
        (("get", "/v1/models"), {"200", "401", "500", "503"}),
        (("get", "/v1/models/{model_id}"), {"200", "401", "404", "500", "503"}),
        (("post", "/v1/keys"), {"201", "400", "401", "403", "413", "500", "503"}),
        (("patch", "/v1/keys/{key_id}"), {"200", "400", "401", "403", "404", "413", "500", "503"}),
        (("get", "/v1/usage"), {"200", "400", "401", "403", "500", "503"}),
        (("post", "/v1/files"), {"200", "400", "401", "413", "500", "503", "507"}),
        (("get", "/v1/files"), {"200", "400", "401", "500", "503"}),
        (("get", "/v1/files/{file_id}"), {"200", "401", "404", "500", "503"}),
        (("get", "/v1/files/{file_id}/content"), {"200", "401", "404", "500", "503"}),
        (("delete", "/v1/files/{file_id}"), {"200", "401", "404", "409", "500", "503"}),
        (("get", "/health"), {"200", "500"}),
        (("get", "/ready"), {"200", "500", "503"}),
        (("get", "/metrics"), {"200", "500"}),
    ],
)
def test_each_route_lists_the_statuses_it_answers(
    document: dict[str, Any], key: tuple[str, str], statuses: set[str]
) -> None:
    assert set(operations(document)[key]["responses"]) == statuses


def test_a_draining_503_is_listed_on_every_route_but_the_probes(document: dict[str, Any]) -> None:
    """The middleware refuses every request but a probe's while the server drains (PROBES)."""
    assert set(document["paths"]) >= PROBES
    for (_, path), op in operations(document).items():
        draining = "`shutting_down`" in op["responses"].get("503", {}).get("description", "")
        assert draining == (path not in PROBES or path == "/ready"), path  # /ready says so itself


def test_embeddings_errors_name_every_request_and_availability_code(document: dict[str, Any]) -> None:
    responses = operations(document)[("post", "/v1/embeddings")]["responses"]
    for error in (*with_subclasses(InvalidRequest), *with_subclasses(ServiceUnavailable)):
        assert f"`{error.code}`" in responses[str(error.status)]["description"]
    assert responses["503"]["headers"]["Retry-After"]["required"] is True
    assert "Retry-After" in responses["429"]["headers"]


def test_embed_sparse_documents_teis_request_and_answer(document: dict[str, Any]) -> None:
    op = operations(document)[("post", "/embed_sparse")]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["inputs"]
    assert {"inputs", "truncate", "truncation_direction", "prompt_name", "model"} == set(body["properties"])
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/EmbedSparseResponse"}
    pair = document["components"]["schemas"]["SparseValue"]
    assert set(pair["properties"]) == {"index", "value"}
    assert set(document["components"]["schemas"]["TEIErrorResponse"]["properties"]) == {"error", "error_type"}


def test_metrics_success_is_documented_as_text(document: dict[str, Any]) -> None:
    ok = operations(document)[("get", "/metrics")]["responses"]["200"]
    assert set(ok["content"]) == {"text/plain"}


def test_the_upload_is_documented_as_a_multipart_form_and_the_content_as_bytes(
    document: dict[str, Any],
) -> None:
    upload = operations(document)[("post", "/v1/files")]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file", "purpose"]
    assert form["properties"]["file"] == {**form["properties"]["file"], "type": "string", "format": "binary"}
    assert form["properties"]["purpose"]["enum"] == ["batch"]
    assert upload["responses"]["507"]["headers"]["Retry-After"]["required"] is True
    content = operations(document)[("get", "/v1/files/{file_id}/content")]["responses"]["200"]
    assert set(content["content"]) == {"application/octet-stream"}
    listing = {p["name"]: p for p in operations(document)[("get", "/v1/files")]["parameters"]}
    assert set(listing) == {"after", "limit", "order", "purpose"}
    assert (listing["limit"]["schema"]["minimum"], listing["limit"]["schema"]["maximum"]) == (1, 10000)


def test_finishing_leaves_fastapis_document_as_it_was() -> None:
    raw = {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/v1/x": {
                "get": {"responses": {"200": {}, "422": {"$ref": "#/components/schemas/HTTPValidationError"}}}
            }
        },
        "components": {"schemas": {"HTTPValidationError": {}, "ValidationError": {}}},
    }
    before = json.dumps(raw)
    finished = finish_document(raw)
    assert json.dumps(raw) == before
    assert finished["paths"]["/v1/x"]["get"] == {"responses": {"200": {}}, "security": [{BEARER: []}]}
    assert finished["components"]["schemas"] == {}


def test_error_responses_group_codes_by_status() -> None:
    responses = error_responses(InvalidRequest, *with_subclasses(ServiceUnavailable), probe=True)
    assert sorted(responses) == [400, 500, 503]
    assert responses[400]["description"] == "Bad Request: `invalid_value`"
    assert responses[503]["description"].count("`shutting_down`") == 1


def test_the_document_is_built_once(document: dict[str, Any]) -> None:
    app = create_app(Settings(), Catalog([]))
    assert app.openapi() is app.openapi()
    assert app.openapi() == document


# ---- against the live, keyed server -------------------------------------------------------------------


def call(server: LiveServer, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    url = server.base_url + path.replace("{model_id}", "all-MiniLM-L6-v2").replace("{key_id}", "nope")
    url = url.replace("{file_id}", "file-nope")
    body = {"model": "all-MiniLM-L6-v2", "input": "x"} if method in ("post", "patch") else None
    return httpx.request(method.upper(), url, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path"), sorted(KEYED | PUBLIC))
def test_the_documented_security_is_what_the_server_enforces(
    server: LiveServer, method: str, path: str
) -> None:
    """A keyed route is 401 without a key and answers past authentication with one (the key and usage
    routes with 403: not an admin key); a public route never asks for one."""
    documented = "security" in operations(httpx.get(f"{server.base_url}/openapi.json").json())[(method, path)]
    anonymous = call(server, method, path, {})
    keyed = call(server, method, path, {"Authorization": f"Bearer {API_KEY}"})
    if documented:
        assert anonymous.status_code == 401, anonymous.text
        if path in TEI_PATHS:  # TEI's error body: a message and its kind, no code
            assert anonymous.json()["error_type"] == "validation"
        else:
            assert anonymous.json()["error"]["code"] == "invalid_api_key"
        assert keyed.status_code != 401, keyed.text
    else:
        assert anonymous.status_code != 401 and keyed.status_code == anonymous.status_code
