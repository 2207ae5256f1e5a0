"""Token ids that are not the model's own are refused, or understood: ids without the special tokens
the model's tokenizer puts around every text (tiktoken's, as LangChain sends them by default) are a 400
that says so and names the fix; a model that opts in (`tiktoken_ids`) reads them back as their text
and embeds that exactly, counting its own tokens; `--alias` serves clients' default model names."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tiktoken
from openai import OpenAI

from conftest import API_KEY, FamilyModels
from embedserve.settings import Settings
from support import LiveServer, live_server
from tiny_tiktoken import build_encoding

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["what is a capybara?", "The capybara is the largest living rodent.", "bridges and engineers"]


def post(live: LiveServer, body: Any, key: str | None = API_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{live.v1}/embeddings", json=body, headers=headers, timeout=60)


def assert_400(response: httpx.Response, code: str, *words: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["type"], error["param"]) == (code, "invalid_request_error", "input")
    for word in words:
        assert word in error["message"], error["message"]
    message: str = error["message"]
    return message


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


@pytest.fixture(scope="session")
def encoding(tmp_path_factory: pytest.TempPathFactory) -> tuple[tiktoken.Encoding, Path]:
    """A small cl100k_base-shaped encoding trained here, and its ranks file."""
    path = tmp_path_factory.mktemp("tiktoken") / "cl100k_base.tiktoken"
    return build_encoding(path), path


# ---- refused, with the fix named -------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [[15339, 1917], [101, 7592, 2088], [7592, 2088, 102]],
    ids=["tiktoken-hello-world", "no-sep", "no-cls"],
)
def test_ids_without_the_models_framing_are_400_naming_the_fix(server: LiveServer, ids: list[int]) -> None:
    message = assert_400(
        post(server, {"model": MODEL, "input": [ids]}),
        "invalid_token_id",
        "[CLS] (101) ... [SEP] (102)",
        "another tokenizer's ids",
        "check_embedding_ctx_length=False",
        "input[0]",
    )
    assert "all-MiniLM-L6-v2" in message
    assert post(server, {"model": MODEL, "input": "still serving"}).status_code == 200


def test_ids_outside_the_vocabulary_give_the_same_hint(server: LiveServer) -> None:
    assert_400(
        post(server, {"model": MODEL, "input": [[101, 90_000, 102]]}),
        "invalid_token_id",
        "90000",
        "outside the vocabulary",
        "check_embedding_ctx_length=False",
    )
    assert post(server, {"model": MODEL, "input": "still serving"}).status_code == 200


def test_the_models_own_framed_ids_still_embed_as_their_text(server: LiveServer) -> None:
    own = [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert np.allclose(
        vectors(post(server, {"model": MODEL, "input": [own]})),
        vectors(post(server, {"model": MODEL, "input": ["hello world"]})),
        atol=1e-5,
    )


# ---- understood, when a model opts in ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reading(
    encoding: tuple[tiktoken.Encoding, Path],
    family_models: FamilyModels,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """MiniLM reading tiktoken ids server-wide, and a Qwen3-Embedding (no framing) that opts in by its
    catalog entry."""
    _, path = encoding
    catalog = tmp_path_factory.mktemp("tiktoken-catalog") / "models.toml"
    catalog.write_text(f"""
[[models]]
source = "{MODEL}"
tiktoken_ids = "cl100k_base"

[[models]]
id = "qwen3"
source = "Qwen/Qwen3-Embedding-0.6B"
tiktoken_ids = "cl100k_base"
""")
    assert family_models.qwen3.is_dir()
    with live_server(Settings(models_file=catalog, api_keys=[API_KEY], tiktoken_file=path)) as live:
        yield live


@pytest.mark.parametrize("model", [MODEL, "qwen3"])
def test_tiktoken_ids_embed_exactly_as_their_text_and_count_the_models_tokens(
    reading: LiveServer, encoding: tuple[tiktoken.Encoding, Path], model: str
) -> None:
    enc, _ = encoding
    ids = [enc.encode(text) for text in TEXTS]
    by_ids, by_text = (
        post(reading, {"model": model, "input": ids}),
        post(reading, {"model": model, "input": TEXTS}),
    )
    assert np.allclose(vectors(by_ids), vectors(by_text), atol=1e-5)
    assert by_ids.json()["usage"] == by_text.json()["usage"], "usage counts the model's own tokens"
    assert by_ids.json()["usage"]["prompt_tokens"] != sum(len(i) for i in ids)


def test_a_model_reading_tiktoken_ids_still_takes_its_own(reading: LiveServer) -> None:
    own = [101, 7592, 2088, 102]
    assert np.allclose(
        vectors(post(reading, {"model": MODEL, "input": [own]})),
        vectors(post(reading, {"model": MODEL, "input": ["hello world"]})),
        atol=1e-5,
    )


def test_an_id_the_encoding_does_not_have_is_400(
    reading: LiveServer, encoding: tuple[tiktoken.Encoding, Path]
) -> None:
    enc, _ = encoding
    gap = enc.max_token_value - 100  # between its ranks and its special tokens: no token
    for ids in ([*enc.encode("hello"), gap], [5, 10**7]):
        assert_400(
            post(reading, {"model": MODEL, "input": [ids]}), "invalid_token_id", str(ids[-1]), "cl100k_base"
        )
    assert post(reading, {"model": MODEL, "input": "still serving"}).status_code == 200


def test_tiktoken_ids_take_the_prompt_a_text_takes(
    reading: LiveServer, encoding: tuple[tiktoken.Encoding, Path]
) -> None:
    enc, _ = encoding
    body: dict[str, Any] = {"model": "qwen3", "input_type": "query"}
    by_ids = post(reading, {**body, "input": [enc.encode(TEXTS[0])]})
    assert np.allclose(vectors(by_ids), vectors(post(reading, {**body, "input": [TEXTS[0]]})), atol=1e-5)


def test_a_missing_encoding_stops_the_server_at_start_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")}
    done = subprocess.run(
        [sys.executable, "-m", "embedserve", "serve", "--tiktoken-ids", "cl100k_base", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cl100k_base" in lines[0] and str(tmp_path / "empty-cache") in lines[0]
    assert "TIKTOKEN_CACHE_DIR" in lines[0] and "--tiktoken-file" in lines[0]


# ---- LangChain's OpenAIEmbeddings itself -------------------------------------------------------------


@pytest.fixture
def langchain_tiktoken(
    encoding: tuple[tiktoken.Encoding, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> tiktoken.Encoding:
    """The client's cl100k_base is the small encoding trained here (tiktoken would download OpenAI's;
    the client machine is offline too): set in tiktoken's registry, where LangChain looks it up."""
    import tiktoken.registry

    enc, _ = encoding
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "cl100k_base", enc)
    return enc


@contextmanager
def langchain(live: LiveServer, **options: Any) -> Iterator[Any]:
    """LangChain's client on an HTTP connection pool the test closes: its own would be closed only when
    collected, and a refusal's traceback puts it in a cycle whose sockets the collector may finalize
    first (a ResourceWarning in a later test)."""
    from langchain_openai import OpenAIEmbeddings

    with httpx.Client(timeout=120) as http:
        yield OpenAIEmbeddings(
            model=MODEL, base_url=live.v1, api_key=API_KEY, max_retries=0, http_client=http, **options
        )


def test_langchain_with_its_defaults_is_told_what_to_change(
    server: LiveServer, langchain_tiktoken: tiktoken.Encoding
) -> None:
    import openai

    with langchain(server) as client, pytest.raises(openai.BadRequestError) as refused:
        client.embed_documents(TEXTS)
    assert refused.value.status_code == 400
    assert "check_embedding_ctx_length=False" in str(refused.value)
    with langchain(server, check_embedding_ctx_length=False) as client:
        by_text = client.embed_documents(TEXTS)
    assert np.allclose(by_text, vectors(post(server, {"model": MODEL, "input": TEXTS})), atol=1e-5)


def test_langchain_with_its_defaults_gets_exact_vectors_where_tiktoken_ids_are_read(
    reading: LiveServer, langchain_tiktoken: tiktoken.Encoding
) -> None:
    with langchain(reading) as client:
        by_ids = client.embed_documents(TEXTS)  # it sends tiktoken ids
        query = client.embed_query(TEXTS[0])
    assert np.allclose(by_ids, vectors(post(reading, {"model": MODEL, "input": TEXTS})), atol=1e-5)
    assert np.allclose(query, by_ids[0], atol=1e-5)


# ---- clients' default model names --------------------------------------------------------------------


@pytest.fixture(scope="module")
def aliased() -> Iterator[LiveServer]:
    settings = Settings(
        aliases=[
            "text-embedding-3-small=all-MiniLM-L6-v2",
            "text-embedding-ada-002=sentence-transformers/all-MiniLM-L6-v2",
        ]
    )
    with live_server(settings) as live:
        yield live


def test_an_alias_serves_a_clients_default_model_name(aliased: LiveServer) -> None:
    client = OpenAI(base_url=aliased.v1, api_key="none", max_retries=0)
    result = client.embeddings.create(model="text-embedding-3-small", input=TEXTS)
    assert result.model == "text-embedding-3-small" and len(result.data[0].embedding) == 384
    same = client.embeddings.create(model=MODEL, input=TEXTS)
    assert np.allclose([d.embedding for d in result.data], [d.embedding for d in same.data], atol=1e-6)
    card = client.models.retrieve("text-embedding-ada-002")
    assert card.id == MODEL
    assert {"text-embedding-3-small", "text-embedding-ada-002"} <= set(card.model_extra["aliases"])


@pytest.mark.parametrize(
    ("alias", "words"),
    [
        ("text-embedding-3-small", ("NAME=MODEL",)),
        ("x=no-such-model", ("no-such-model", "all-MiniLM-L6-v2")),
        ("all-MiniLM-L6-v2=all-MiniLM-L6-v2", ("twice",)),
    ],
)
def test_a_bad_alias_stops_the_cli_with_one_line(alias: str, words: tuple[str, ...]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "embedserve", "models", "--alias", alias],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), done.stderr
