"""Outputs beyond the dense vector on the wire, through a live server: `outputs` with the official client
(sparse and ColBERT equal to FlagEmbedding's, in float and base64), token usage counted once, the model
cards' outputs, every bad `outputs` / `output_dtype`, and TEI's POST /embed_sparse with its shapes."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from openai import OpenAI

from conftest import FamilyModels
from embedserve.api.errors import error_body, error_shape
from embedserve.backends.fake import fake_backends
from embedserve.errors import (
    AuthenticationFailed,
    EmbedServeError,
    EmptyInput,
    InternalError,
    InvalidType,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RateLimitExceeded,
    ShuttingDown,
    UnsupportedOutput,
)
from embedserve.settings import Settings
from gates import wait_until
from support import MIXED_TEXTS, LiveServer, live_server, private_data_dir
from tiny_models import M3Outputs, bge_m3_outputs_reference, build_tiny_bge_m3

M3 = "BAAI/bge-m3"  # the tiny bge-m3 with its heads, on torch (the ONNX backend's heads come later)
DENSE_ONLY = "bge-m3-no-heads"
MINILM = "all-MiniLM-L6-v2"
KEY = "sk-hybrid-user"
ADMIN = "sk-hybrid-admin"
ALL = ["dense", "sparse", "colbert"]
MAX_TOKENS = 512


@pytest.fixture(scope="module")
def hybrid_server(
    tmp_path_factory: pytest.TempPathFactory, family_models: FamilyModels
) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("hybrid")
    no_heads = build_tiny_bge_m3(root / "no-heads" / "bge-m3", heads=False, seed=2)
    models = root / "models.toml"
    models.write_text(f"""
[[models]]
source = "{M3}"
backend = "torch"
max_input_tokens = {MAX_TOKENS}
matryoshka_dimensions = [16, 32]

[[models]]
id = "{DENSE_ONLY}"
source = "{no_heads}"
backend = "torch"

[[models]]
source = "{MINILM}"
""")
    settings = Settings(
        models_file=models,
        data_dir=private_data_dir(root / "data"),
        api_keys=[KEY],
        admin_keys=[ADMIN],
        usage_flush_interval=0.05,
    )
    with live_server(settings) as live:
        yield live


@pytest.fixture(scope="module")
def client(hybrid_server: LiveServer) -> OpenAI:
    return OpenAI(base_url=hybrid_server.v1, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(family_models: FamilyModels) -> M3Outputs:
    return bge_m3_outputs_reference(family_models.bge_m3, MIXED_TEXTS)


def _post(server: LiveServer, path: str, body: Any, key: str | None = KEY) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=60)


def _colbert(value: Any) -> np.ndarray:
    """A colbert_embedding as an [n, C] array: a list of vectors, or base64 float32 with its shape."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["data"]), dtype="<f4")
        return flat.reshape(value["shape"])
    return np.asarray(value, dtype=np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _still_serves(client: OpenAI) -> None:
    assert len(client.embeddings.create(model=M3, input="still here").data[0].embedding) == 32


def _assert_matches_reference(data: list[Any], reference: M3Outputs) -> None:
    for i, item in enumerate(data):
        extra = item.model_extra
        expected = reference.lexical_weights[i]
        sparse = extra["sparse_embedding"]
        assert sparse["indices"] == sorted(expected), i
        np.testing.assert_allclose(sparse["values"], [expected[t] for t in sorted(expected)], atol=1e-4)
        colbert = _colbert(extra["colbert_embedding"])
        assert colbert.shape == reference.colbert_vecs[i].shape, i
        assert _cosines(colbert, reference.colbert_vecs[i]).min() >= 0.9999, i
        dense = np.asarray(item.embedding, dtype=np.float32)
        assert _cosines(dense, reference.dense[i]) >= 0.9999, i


def test_sparse_and_colbert_as_floats_match_flagembedding_for_a_mixed_length_batch(
    client: OpenAI, reference: M3Outputs
) -> None:
    response = client.embeddings.create(
        model=M3, input=MIXED_TEXTS, encoding_format="float", extra_body={"outputs": ALL}
    )
    _assert_matches_reference(response.data, reference)
    assert all(isinstance(item.model_extra["colbert_embedding"], list) for item in response.data)


def test_the_sdks_default_base64_carries_colbert_as_one_float32_buffer_with_its_shape(
    client: OpenAI, reference: M3Outputs
) -> None:
    """The SDK asks for base64 and decodes `embedding` only: colbert_embedding stays {data, shape}."""
    response = client.embeddings.create(model=M3, input=MIXED_TEXTS, extra_body={"outputs": ALL})
    for item, vectors in zip(response.data, reference.colbert_vecs, strict=True):
        packed = item.model_extra["colbert_embedding"]
        assert set(packed) == {"data", "shape"} and packed["shape"] == list(vectors.shape)
    _assert_matches_reference(response.data, reference)


def test_embedding_is_the_same_whether_or_not_other_outputs_are_asked(client: OpenAI) -> None:
    plain = client.embeddings.create(model=M3, input=MIXED_TEXTS, encoding_format="float")
    hybrid = client.embeddings.create(
        model=M3, input=MIXED_TEXTS, encoding_format="float", extra_body={"outputs": ALL}
    )
    assert all(item.model_extra == {} for item in plain.data)  # nothing added unless asked
    np.testing.assert_allclose(
        [d.embedding for d in hybrid.data], [d.embedding for d in plain.data], rtol=0, atol=1e-6
    )


def test_dimensions_cut_the_dense_vector_only(client: OpenAI) -> None:
    full = client.embeddings.create(
        model=M3, input=MIXED_TEXTS, encoding_format="float", extra_body={"outputs": ALL}
    )
    cut = client.embeddings.create(
        model=M3, input=MIXED_TEXTS, encoding_format="float", dimensions=16, extra_body={"outputs": ALL}
    )
    for whole, short in zip(full.data, cut.data, strict=True):
        assert len(short.embedding) == 16
        head = np.asarray(whole.embedding[:16])
        np.testing.assert_allclose(short.embedding, head / np.linalg.norm(head), atol=1e-6)
        assert (
            short.model_extra["sparse_embedding"]["indices"]
            == whole.model_extra["sparse_embedding"]["indices"]
        )
        np.testing.assert_allclose(
            _colbert(short.model_extra["colbert_embedding"]),
            _colbert(whole.model_extra["colbert_embedding"]),
            atol=1e-6,
        )
        assert _colbert(short.model_extra["colbert_embedding"]).shape[1] == 32


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_outputs_without_dense_give_an_empty_embedding_that_the_sdk_parses(
    client: OpenAI, encoding_format: str | None
) -> None:
    """None: the SDK's own default (base64 on the wire, decoded by the SDK)."""
    options: dict[str, Any] = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = client.embeddings.create(
        model=M3, input=MIXED_TEXTS, extra_body={"outputs": ["sparse"]}, **options
    )
    for item in response.data:
        assert len(item.embedding) == 0
        assert set(item.model_extra["sparse_embedding"]) == {"indices", "values"}
        assert "colbert_embedding" not in item.model_extra


def _billed(server: LiveServer) -> tuple[int, int]:
    """(requests, prompt tokens) in the ledger for the bge-m3, once every record made so far is written."""
    wait_until(lambda: server.state.ledger.pending == 0, "the ledger has flushed")
    report = httpx.get(
        f"{server.v1}/usage", params={"group_by": "model"}, headers={"Authorization": f"Bearer {ADMIN}"}
    ).json()
    row = next((row for row in report["data"] if row["model"] == M3), {"requests": 0, "prompt_tokens": 0})
    return row["requests"], row["prompt_tokens"]


def test_usage_counts_each_input_once_whatever_outputs_are_asked(
    hybrid_server: LiveServer, client: OpenAI
) -> None:
    requests, tokens = _billed(hybrid_server)
    one = client.embeddings.create(model=M3, input=MIXED_TEXTS).usage
    three = client.embeddings.create(model=M3, input=MIXED_TEXTS, extra_body={"outputs": ALL}).usage
    sparse_only = client.embeddings.create(
        model=M3, input=MIXED_TEXTS, extra_body={"outputs": ["sparse"]}
    ).usage
    tei = _post(hybrid_server, "/embed_sparse", {"inputs": MIXED_TEXTS})
    assert tei.status_code == 200, tei.text
    assert one.prompt_tokens == three.prompt_tokens == sparse_only.prompt_tokens == three.total_tokens
    assert int(tei.headers["x-compute-tokens"]) == one.prompt_tokens
    # one record a request, each input's tokens counted once
    assert _billed(hybrid_server) == (requests + 4, tokens + 4 * one.prompt_tokens)


def test_the_model_list_names_each_models_outputs(client: OpenAI) -> None:
    cards = {card.id: card.model_extra for card in client.models.list().data}
    assert cards[M3]["outputs"] == ALL
    assert cards[DENSE_ONLY]["outputs"] == ["dense"]
    assert cards[MINILM]["outputs"] == ["dense"]
    assert client.models.retrieve(M3).model_extra["outputs"] == ALL


@pytest.mark.parametrize(
    ("extra", "code", "param", "says"),
    [
        ({"outputs": "sparse"}, "invalid_type", "outputs", "non-empty array"),
        ({"outputs": []}, "invalid_type", "outputs", "non-empty array"),
        ({"outputs": ["dense", 3]}, "invalid_type", "outputs", "non-empty array"),
        ({"outputs": ["lexical"]}, "unsupported_output", "outputs", "'lexical'"),
        ({"outputs": ["sparse", "sparse"]}, "invalid_type", "outputs", "twice"),
        ({"model": MINILM, "outputs": ["sparse"]}, "unsupported_output", "outputs", "['dense']"),
        (
            {"model": DENSE_ONLY, "outputs": ["dense", "colbert"]},
            "unsupported_output",
            "outputs",
            "['dense']",
        ),
        ({"output_dtype": "float16"}, "invalid_output_dtype", "output_dtype", "'float16'"),
        ({"output_dtype": 8}, "invalid_output_dtype", "output_dtype", "must be one of"),
        ({"outputs": ["sparse"], "output_dtype": "int8"}, "invalid_output_dtype", "output_dtype", "dense"),
    ],
)
def test_a_bad_outputs_or_output_dtype_is_a_400_naming_it_and_the_server_still_serves(
    hybrid_server: LiveServer,
    client: OpenAI,
    extra: dict[str, Any],
    code: str,
    param: str,
    says: str,
) -> None:
    response = _post(hybrid_server, "/v1/embeddings", {"model": M3, "input": "a text", **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert says in error["message"]
    _still_serves(client)


# ---- TEI's POST /embed_sparse ---------------------------------------------------------------------------


def _v1_sparse(
    client: OpenAI, inputs: list[str] | list[list[int]], model: str = M3
) -> list[list[dict[str, Any]]]:
    """The /v1/embeddings sparse output of `inputs`, as TEI's [{"index", "value"}] lists."""
    data = client.embeddings.create(model=model, input=inputs, extra_body={"outputs": ["sparse"]}).data
    return [
        [
            {"index": index, "value": value}
            for index, value in zip(
                item.model_extra["sparse_embedding"]["indices"],
                item.model_extra["sparse_embedding"]["values"],
                strict=True,
            )
        ]
        for item in data
    ]


def test_embed_sparse_answers_teis_shape_for_one_input_equal_to_the_v1_sparse_output(
    hybrid_server: LiveServer, client: OpenAI
) -> None:
    response = _post(hybrid_server, "/embed_sparse", {"inputs": MIXED_TEXTS[1]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == _v1_sparse(client, [MIXED_TEXTS[1]])
    (only,) = response.json()
    assert [pair["index"] for pair in only] == sorted({pair["index"] for pair in only})
    assert all(pair["value"] > 0 for pair in only)


def test_embed_sparse_answers_one_list_per_input_for_a_batch_of_texts_or_token_ids(
    hybrid_server: LiveServer, client: OpenAI, reference: M3Outputs, family_models: FamilyModels
) -> None:
    texts = _post(
        hybrid_server, "/embed_sparse", {"inputs": MIXED_TEXTS, "truncate": False, "raw_scores": True}
    )
    assert texts.status_code == 200, texts.text
    assert texts.json() == _v1_sparse(client, MIXED_TEXTS)
    for pairs, expected in zip(texts.json(), reference.lexical_weights, strict=True):
        assert [p["index"] for p in pairs] == sorted(expected)
        np.testing.assert_allclose(
            [p["value"] for p in pairs], [expected[t] for t in sorted(expected)], atol=1e-4
        )
    from tiny_models import token_ids

    ids = token_ids(family_models.bge_m3, MIXED_TEXTS[:2])
    by_ids = _post(hybrid_server, "/embed_sparse", {"inputs": ids})
    assert by_ids.status_code == 200, by_ids.text
    assert by_ids.json() == texts.json()[:2]
    one_array = _post(hybrid_server, "/embed_sparse", {"inputs": ids[0]})  # TEI: one input of ids
    assert one_array.json() == texts.json()[:1]


def test_embed_sparse_takes_the_model_extension_and_truncate_per_request(
    hybrid_server: LiveServer, client: OpenAI
) -> None:
    named = _post(hybrid_server, "/embed_sparse", {"inputs": "a text", "model": M3})
    assert named.json() == _v1_sparse(client, ["a text"])
    long_text = "word " * (MAX_TOKENS + 50)
    refused = _post(hybrid_server, "/embed_sparse", {"inputs": long_text})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error_type"] == "validation" and str(MAX_TOKENS) in refused.json()["error"]
    cut = _post(hybrid_server, "/embed_sparse", {"inputs": long_text, "truncate": True})
    assert cut.status_code == 200, cut.text
    assert int(cut.headers["x-compute-tokens"]) == MAX_TOKENS


@pytest.mark.parametrize(
    ("body", "status", "error_type", "says"),
    [
        ({"inputs": ""}, 400, "empty", "'inputs' must not be an empty string"),
        ({"inputs": []}, 400, "empty", "'inputs' must not be an empty array"),
        ({"inputs": ["a", ""]}, 400, "empty", "inputs[1]"),
        ({"inputs": 5}, 400, "validation", "'inputs' must be a string"),
        ({"inputs": ["a", [1, 2]]}, 400, "validation", "mixed arrays"),
        ({"input": "a text"}, 400, "validation", "inputs parameter"),
        ([{"inputs": "a"}], 400, "validation", "JSON object"),
        ({"inputs": "a", "truncate": "yes"}, 400, "validation", "'truncate'"),
        ({"inputs": "a", "truncation_direction": "left"}, 400, "validation", "'right'"),
        ({"inputs": "a", "prompt_name": "nope"}, 400, "validation", "nope"),
        ({"inputs": "a", "model": MINILM}, 400, "validation", "['dense']"),
        ({"inputs": "a", "model": DENSE_ONLY}, 400, "validation", "['dense']"),
        ({"inputs": "a", "model": "no-such-model"}, 404, "validation", "no-such-model"),
    ],
)
def test_a_bad_embed_sparse_request_gets_teis_error_shape_and_the_server_still_serves(
    hybrid_server: LiveServer, client: OpenAI, body: Any, status: int, error_type: str, says: str
) -> None:
    response = _post(hybrid_server, "/embed_sparse", body)
    assert response.status_code == status, response.text
    assert response.json() == {"error": response.json()["error"], "error_type": error_type}
    assert says in response.json()["error"]
    assert response.headers["x-request-id"]
    _still_serves(client)
    assert _post(hybrid_server, "/embed_sparse", {"inputs": "fine"}).status_code == 200


@pytest.mark.parametrize("key", [None, "sk-not-a-key"])
def test_embed_sparse_needs_a_key_as_v1_embeddings_does(
    hybrid_server: LiveServer, client: OpenAI, key: str | None
) -> None:
    response = _post(hybrid_server, "/embed_sparse", {"inputs": "a text"}, key=key)
    assert response.status_code == 401
    assert response.json()["error_type"] == "validation" and "API key" in response.json()["error"]
    _still_serves(client)


def test_a_body_over_the_limit_on_embed_sparse_is_a_413_in_teis_shape(hybrid_server: LiveServer) -> None:
    huge = "x" * (hybrid_server.settings.max_body_bytes + 10)
    response = _post(hybrid_server, "/embed_sparse", {"inputs": huge})
    assert response.status_code == 413
    assert response.json()["error_type"] == "validation"


def test_embed_sparse_is_counted_under_its_own_route_in_the_metrics(hybrid_server: LiveServer) -> None:
    assert _post(hybrid_server, "/embed_sparse", {"inputs": "counted"}).status_code == 200
    series = f'embedserve_requests_total{{model="{M3}",route="/embed_sparse",status="200"}}'
    # (the request is counted once its response is sent)
    wait_until(
        lambda: series in httpx.get(f"{hybrid_server.base_url}/metrics").text, "the request is counted"
    )


def test_a_key_over_its_request_rate_gets_a_429_in_teis_shape_with_retry_after(
    hybrid_server: LiveServer,
) -> None:
    created = httpx.post(
        f"{hybrid_server.v1}/keys",
        json={"name": "hybrid-rpm", "rpm": 1},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert created.status_code == 201, created.text
    limited = created.json()["key"]
    assert _post(hybrid_server, "/embed_sparse", {"inputs": "first"}, key=limited).status_code == 200
    refused = _post(hybrid_server, "/embed_sparse", {"inputs": "second"}, key=limited)
    assert refused.status_code == 429
    assert refused.json()["error_type"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("error", "error_type"),
    [
        (EmptyInput("empty"), "empty"),
        (InvalidType("wrong"), "validation"),
        (UnsupportedOutput("lacks it"), "validation"),
        (AuthenticationFailed("no key"), "validation"),
        (ModelNotFound("nope"), "validation"),
        (PayloadTooLarge("big"), "validation"),
        (RateLimitExceeded("slow down", retry_after_s=1), "overloaded"),
        (Overloaded("busy", retry_after_s=1), "overloaded"),
        (ModelNotReady("loading", retry_after_s=1), "unhealthy"),
        (ShuttingDown("draining", retry_after_s=1), "unhealthy"),
        (InternalError("bug"), "backend"),
    ],
)
def test_each_error_has_teis_error_type_in_teis_body(error: EmbedServeError, error_type: str) -> None:
    assert error_shape("/embed_sparse") == "tei" and error_shape("/v1/embeddings") == "openai"
    assert orjson.loads(error_body(error, "tei")) == {"error": error.message, "error_type": error_type}


# ---- two models with sparse vectors, on fake backends (the whole app, no weights) -----------------------


@pytest.fixture(scope="module")
def two_sparse_server(
    tmp_path_factory: pytest.TempPathFactory, family_models: FamilyModels
) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("two-sparse")
    models = root / "models.toml"
    models.write_text(f"""
[[models]]
id = "m3-a"
source = "{family_models.bge_m3}"

[[models]]
id = "m3-b"
source = "{family_models.bge_m3}"
""")
    settings = Settings(models_file=models, data_dir=private_data_dir(root / "data"), api_keys=[KEY])
    with live_server(settings, backends=fake_backends()) as live:
        yield live


def test_embed_sparse_without_a_model_among_several_sparse_models_is_a_400_naming_them(
    two_sparse_server: LiveServer,
) -> None:
    refused = _post(two_sparse_server, "/embed_sparse", {"inputs": MIXED_TEXTS})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error_type"] == "validation"
    assert "m3-a" in refused.json()["error"] and "m3-b" in refused.json()["error"]
    client = OpenAI(base_url=two_sparse_server.v1, api_key=KEY, max_retries=0)
    for model in ("m3-a", "m3-b"):
        named = _post(two_sparse_server, "/embed_sparse", {"inputs": MIXED_TEXTS, "model": model})
        assert named.status_code == 200, named.text
        assert named.json() == _v1_sparse(client, MIXED_TEXTS, model=model)
