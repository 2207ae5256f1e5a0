"""POST /v1/embeddings through a live server: shapes, formats, usage, token ids, dimensions, and a
400 with an OpenAI error body for every bad input."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI
from tokenizers import Tokenizer

from conftest import API_KEY, MAX_TOKENS_PER_REQUEST, MRL_DIMS
from support import LiveServer, bundled_folder

MODEL = "all-MiniLM-L6-v2"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(bundled_folder() / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads to 128 and truncates at 128
    tok.no_truncation()
    return tok


def post(server: LiveServer, body: Any, **kwargs: Any) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{server.v1}/embeddings", content=body, headers=AUTH, timeout=120, **kwargs)
    return httpx.post(f"{server.v1}/embeddings", json=body, headers=AUTH, timeout=120, **kwargs)


def assert_openai_error(
    response: httpx.Response, status: int, code: str | None, param: str | None = None, *words: str
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    for word in words:
        assert word in error["message"], error["message"]
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"]
    return error


def decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


# ---- success ----------------------------------------------------------------------------------------


def test_single_string_returns_one_unit_vector_with_exact_usage(
    server: LiveServer, tokenizer: Tokenizer
) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    response = post(server, {"model": MODEL, "input": text})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == MODEL
    assert len(body["data"]) == 1
    item = body["data"][0]
    assert item["object"] == "embedding" and item["index"] == 0
    vector = np.asarray(item["embedding"])
    assert vector.shape == (384,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    n = len(tokenizer.encode(text).ids)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    assert response.headers["content-type"] == "application/json"


def test_array_of_strings_keeps_input_order_and_counts_every_token(
    server: LiveServer, tokenizer: Tokenizer
) -> None:
    texts = ["alpha", "a much longer sentence about something else entirely", "gamma ray"]
    body = post(server, {"model": MODEL, "input": texts}).json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    singles = [post(server, {"model": MODEL, "input": t}).json()["data"][0]["embedding"] for t in texts]
    for item, single in zip(body["data"], singles, strict=True):
        assert np.allclose(item["embedding"], single, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(t).ids) for t in texts)


def test_base64_is_little_endian_float32_of_the_float_vector(server: LiveServer) -> None:
    floats = post(server, {"model": MODEL, "input": ["one", "two"]}).json()
    packed = post(server, {"model": MODEL, "input": ["one", "two"], "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], packed["data"], strict=True):
        assert isinstance(b["embedding"], str)
        assert np.allclose(decode(b["embedding"]), f["embedding"], atol=1e-7)
    assert floats["usage"] == packed["usage"]


def test_explicit_null_encoding_format_means_float_and_unknown_fields_are_ignored(server: LiveServer) -> None:
    body = post(
        server,
        {"model": MODEL, "input": "x", "encoding_format": None, "user": "u-1", "some_future_field": {"a": 1}},
    ).json()
    assert isinstance(body["data"][0]["embedding"], list)


def test_openai_sdk_default_path_asks_base64_and_gets_floats(server: LiveServer, client: OpenAI) -> None:
    requests: list[httpx.Request] = []
    # A client we pass in is ours to close: only the SDK's own closes itself when it is collected.
    with httpx.Client(event_hooks={"request": [requests.append]}) as http:
        sdk = OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, http_client=http)
        result = sdk.embeddings.create(model=MODEL, input=["hello world", "bonjour"])
    assert b'"encoding_format":"base64"' in requests[0].content.replace(b" ", b"")
    reference = post(server, {"model": MODEL, "input": ["hello world", "bonjour"]}).json()
    for got, want in zip(result.data, reference["data"], strict=True):
        assert isinstance(got.embedding, list) and len(got.embedding) == 384
        assert np.allclose(got.embedding, want["embedding"], atol=1e-6)
    assert result.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert result.model == MODEL


def test_openai_sdk_float_path(client: OpenAI) -> None:
    result = client.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    assert len(result.data[0].embedding) == 384
    assert result.object == "list"


def test_alias_is_served_and_echoed(server: LiveServer) -> None:
    alias = "sentence-transformers/all-MiniLM-L6-v2"
    body = post(server, {"model": alias, "input": "x"}).json()
    direct = post(server, {"model": MODEL, "input": "x"}).json()
    assert body["model"] == alias
    assert np.allclose(body["data"][0]["embedding"], direct["data"][0]["embedding"], atol=1e-6)


def test_token_ids_give_the_same_vector_as_the_text(server: LiveServer, tokenizer: Tokenizer) -> None:
    texts = ["Token ids are the model's own input ids.", "short"]
    ids = [tokenizer.encode(t).ids for t in texts]
    by_text = post(server, {"model": MODEL, "input": texts}).json()
    by_ids = post(server, {"model": MODEL, "input": ids}).json()
    one = post(server, {"model": MODEL, "input": ids[0]}).json()
    for a, b in zip(by_text["data"], by_ids["data"], strict=True):
        assert np.allclose(a["embedding"], b["embedding"], atol=1e-5)
    assert len(one["data"]) == 1
    assert np.allclose(one["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-5)
    assert by_ids["usage"]["prompt_tokens"] == sum(map(len, ids)) == by_text["usage"]["prompt_tokens"]


@pytest.mark.parametrize("fmt", ["float", "base64"])
@pytest.mark.parametrize("dims", MRL_DIMS)
def test_dimensions_truncate_then_renormalize(server: LiveServer, fmt: str, dims: int) -> None:
    full = np.asarray(
        post(server, {"model": "minilm-mrl", "input": "matryoshka"}).json()["data"][0]["embedding"]
    )
    body = post(
        server, {"model": "minilm-mrl", "input": "matryoshka", "dimensions": dims, "encoding_format": fmt}
    ).json()
    got = body["data"][0]["embedding"]
    vector = decode(got) if fmt == "base64" else np.asarray(got)
    assert vector.shape == (dims,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    expected = full[:dims] / np.linalg.norm(full[:dims])
    assert np.allclose(vector, expected, atol=1e-5)


def test_sdk_dimensions(client: OpenAI) -> None:
    result = client.embeddings.create(model="minilm-mrl", input=["a", "b"], dimensions=128)
    assert [len(d.embedding) for d in result.data] == [128, 128]


def test_max_inputs_per_request_is_accepted(server: LiveServer) -> None:
    texts = [f"item {i}" for i in range(2048)]
    body = post(server, {"model": MODEL, "input": texts, "encoding_format": "base64"}).json()
    assert len(body["data"]) == 2048
    assert [d["index"] for d in body["data"]] == list(range(2048))
    sample = post(server, {"model": MODEL, "input": [texts[0], texts[1000], texts[2047]]}).json()
    for i, item in zip((0, 1000, 2047), sample["data"], strict=True):
        assert np.allclose(decode(body["data"][i]["embedding"]), item["embedding"], atol=1e-5)


# ---- bad input: 400 and an OpenAI error body, then the server keeps serving --------------------------

BAD_BODIES: list[tuple[str, Any, str, str | None, tuple[str, ...]]] = [
    ("malformed json", b'{"model": "x", "input": ', "invalid_json", None, ("JSON",)),
    ("empty body", b"", "invalid_json", None, ()),
    ("body is an array", [1, 2], "invalid_type", None, ("object",)),
    ("body is a string", '"hello"', "invalid_type", None, ("object",)),
    ("missing model", {"input": "x"}, "missing_required_parameter", "model", ("model",)),
    ("null model", {"model": None, "input": "x"}, "missing_required_parameter", "model", ()),
    ("model not a string", {"model": 3, "input": "x"}, "invalid_type", "model", ()),
    ("missing input", {"model": MODEL}, "missing_required_parameter", "input", ("input",)),
    ("empty string", {"model": MODEL, "input": ""}, "empty_input", "input", ()),
    ("empty array", {"model": MODEL, "input": []}, "empty_input", "input", ()),
    (
        "empty string inside array",
        {"model": MODEL, "input": ["a", ""]},
        "empty_input",
        "input",
        ("input[1]",),
    ),
    ("empty token array", {"model": MODEL, "input": [[101, 102], []]}, "empty_input", "input", ("input[1]",)),
    ("number input", {"model": MODEL, "input": 5}, "invalid_type", "input", ()),
    ("object input", {"model": MODEL, "input": {"text": "x"}}, "invalid_type", "input", ()),
    ("boolean input", {"model": MODEL, "input": True}, "invalid_type", "input", ()),
    ("mixed strings and ids", {"model": MODEL, "input": ["a", 5]}, "invalid_type", "input", ("mixed",)),
    ("mixed ids and arrays", {"model": MODEL, "input": [[101], 5]}, "invalid_type", "input", ()),
    ("nested strings", {"model": MODEL, "input": [["a"]]}, "invalid_type", "input", ()),
    ("float token ids", {"model": MODEL, "input": [101.5, 102]}, "invalid_type", "input", ()),
    ("negative token id", {"model": MODEL, "input": [101, -1, 102]}, "invalid_token_id", "input", ("-1",)),
    (
        "token id beyond vocabulary",
        {"model": MODEL, "input": [[101, 102], [101, 30522, 102]]},
        "invalid_token_id",
        "input",
        ("30522", "input[1]"),
    ),
    (
        "bad encoding_format",
        {"model": MODEL, "input": "x", "encoding_format": "int8"},
        "invalid_encoding_format",
        "encoding_format",
        ("int8",),
    ),
    (
        "dimensions on a non-matryoshka model",
        {"model": MODEL, "input": "x", "dimensions": 128},
        "unsupported_dimensions",
        "dimensions",
        ("Matryoshka",),
    ),
    (
        "dimensions not allowed",
        {"model": "minilm-mrl", "input": "x", "dimensions": 100},
        "unsupported_dimensions",
        "dimensions",
        ("[64, 128, 256, 384]",),
    ),
    (
        "dimensions above the model's",
        {"model": "minilm-mrl", "input": "x", "dimensions": 1024},
        "unsupported_dimensions",
        "dimensions",
        ("[64, 128, 256, 384]",),
    ),
    (
        "dimensions not an integer",
        {"model": "minilm-mrl", "input": "x", "dimensions": "64"},
        "invalid_type",
        "dimensions",
        (),
    ),
    ("user not a string", {"model": MODEL, "input": "x", "user": 12}, "invalid_type", "user", ()),
    (
        "too many inputs",
        {"model": MODEL, "input": ["x"] * 2049},
        "too_many_inputs",
        "input",
        ("2049", "2048"),
    ),
    (
        "too many tokens in all",
        {"model": MODEL, "input": ["word " * 200] * 100},
        "too_many_tokens",
        "input",
        (str(MAX_TOKENS_PER_REQUEST),),
    ),
]


@pytest.mark.parametrize(
    ("body", "code", "param", "words"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
def test_bad_input_is_400_with_openai_error_and_server_keeps_serving(
    server: LiveServer, body: Any, code: str, param: str | None, words: tuple[str, ...]
) -> None:
    error = assert_openai_error(post(server, body), 400, code, param, *words)
    assert error["type"] == "invalid_request_error"
    assert post(server, {"model": MODEL, "input": "still serving"}).status_code == 200


def test_input_over_the_context_length_names_limit_length_and_index(
    server: LiveServer, tokenizer: Tokenizer
) -> None:
    long_text = "tokens " * 150  # within the first window read of a text: counted exactly
    n = len(tokenizer.encode(long_text).ids)
    assert n > 256
    error = assert_openai_error(
        post(server, {"model": MODEL, "input": ["fine", long_text]}),
        400,
        "context_length_exceeded",
        "input",
        "256",
        str(n),
        "input[1]",
    )
    assert error["type"] == "invalid_request_error"


def test_token_array_over_the_context_length_is_400(server: LiveServer) -> None:
    assert_openai_error(
        post(server, {"model": MODEL, "input": [101] + [1000] * 300 + [102]}),
        400,
        "context_length_exceeded",
        "input",
        "302",
        "256",
    )


def test_unknown_model_is_404_model_not_found(server: LiveServer) -> None:
    error = assert_openai_error(
        post(server, {"model": "text-embedding-3-small", "input": "x"}),
        404,
        "model_not_found",
        "model",
        "text-embedding-3-small",
    )
    assert error["type"] == "invalid_request_error"


def test_sdk_raises_bad_request_with_the_error_body(client: OpenAI) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input="")
    assert caught.value.status_code == 400
    assert caught.value.code == "empty_input"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def test_body_over_the_limit_is_413_without_being_read(server: LiveServer) -> None:
    limit = server.settings.max_body_bytes
    big = b'{"model": "all-MiniLM-L6-v2", "input": "' + b"a" * limit + b'"}'
    assert_openai_error(post(server, big), 413, "payload_too_large", None, str(limit))

    def chunks() -> Any:  # no Content-Length: the server must stop reading once past the limit
        yield b'{"model": "all-MiniLM-L6-v2", "input": "'
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    response = httpx.post(f"{server.v1}/embeddings", content=chunks(), headers=AUTH, timeout=60)
    assert_openai_error(response, 413, "payload_too_large", None)
    assert post(server, {"model": MODEL, "input": "still serving"}).status_code == 200
