"""Served vectors equal the reference recipe: `SentenceTransformer(folder).encode(texts,
normalize_embeddings=True)`, cosine >= 0.9999 for every input of a varied set, whether the inputs come
one per request or together in one padded batch, as text or as token ids."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from conftest import API_KEY
from support import LiveServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}

VARIED = [
    "hi",
    "A",
    "The quick brown fox jumps over the lazy dog.",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\nlines\r\nand    runs   of spaces",
    " ",
    "\n\n",
    "Ünïcödé: café, naïve, Straße, Ærøskøbing",
    "中文句子：今天天气很好。日本語の文も。한국어 문장도.",
    "emoji 🚀🔥👍🏽 and symbols ∑∫√≈≠ ©®™",
    "עברית ועربية mixed with English",
    "UPPER CASE and lower case and MiXeD CaSe",
    "1234567890 3.14159 -42 1e10 0xDEADBEEF",
    "https://example.com/path?query=1&x=y#frag and user@example.com",
    "def embed(texts: list[str]) -> np.ndarray:  # code",
    ("A long passage about sentence embeddings. " * 22).strip(),  # ~200 tokens
    "word " * 240,  # near the 256-token limit
]


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    result: np.ndarray = np.sum(got * want, axis=1)
    return result


def embed(server: LiveServer, model: str, inputs: list[Any]) -> np.ndarray:
    response = httpx.post(
        f"{server.v1}/embeddings",
        headers=AUTH,
        timeout=120,
        json={"model": model, "input": inputs, "encoding_format": "base64"},
    )
    assert response.status_code == 200, response.text
    return np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in response.json()["data"]]
    )


def test_every_varied_input_matches_sentence_transformers_in_one_batch(
    server: LiveServer, st_model: Any
) -> None:
    reference = st_model.encode(VARIED, normalize_embeddings=True)
    got = embed(server, "all-MiniLM-L6-v2", VARIED)
    assert got.shape == reference.shape == (len(VARIED), 384)
    assert cosines(got, reference).min() >= 0.9999


def test_every_varied_input_matches_sentence_transformers_one_per_request(
    server: LiveServer, st_model: Any
) -> None:
    client = OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)
    reference = st_model.encode(VARIED, normalize_embeddings=True)
    got = np.stack(
        [client.embeddings.create(model="all-MiniLM-L6-v2", input=text).data[0].embedding for text in VARIED]
    )
    assert cosines(got, reference).min() >= 0.9999


def test_token_ids_from_the_reference_tokenizer_match_the_reference_vectors(
    server: LiveServer, st_model: Any
) -> None:
    ids = [st_model.tokenizer(text.strip())["input_ids"] for text in VARIED]
    reference = st_model.encode(VARIED, normalize_embeddings=True)
    got = embed(server, "all-MiniLM-L6-v2", ids)
    assert cosines(got, reference).min() >= 0.9999


def test_default_prompt_is_prepended_embedded_and_counted(server: LiveServer, st_model: Any) -> None:
    texts = ["what is the capital of France?", "Paris is the capital of France."]
    reference = st_model.encode(texts, prompt="passage: ", normalize_embeddings=True)
    response = httpx.post(
        f"{server.v1}/embeddings", headers=AUTH, json={"model": "minilm-prompted", "input": texts}
    )
    got = np.asarray([d["embedding"] for d in response.json()["data"]])
    assert cosines(got, reference).min() >= 0.9999
    plain = httpx.post(
        f"{server.v1}/embeddings", headers=AUTH, json={"model": "all-MiniLM-L6-v2", "input": texts}
    ).json()
    prompt_tokens = len(st_model.tokenizer("passage:", add_special_tokens=False)["input_ids"])
    assert response.json()["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 2 * prompt_tokens


def test_cls_pooling_and_dense_head_match_sentence_transformers(
    server: LiveServer, tiny_dense_model: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    reference_model = SentenceTransformer(str(tiny_dense_model), device="cpu")
    texts = [t for t in VARIED if len(t) < 300]
    reference = reference_model.encode(texts, normalize_embeddings=True)
    got = embed(server, "tiny-cls-dense", texts)
    assert got.shape == (len(texts), 16)
    assert cosines(got, reference).min() >= 0.9999


@pytest.mark.parametrize("pooling", ["mean", "cls", "lasttoken"])
def test_each_pooling_mode_without_normalize_matches_sentence_transformers(
    tmp_path: Path, pooling: str
) -> None:
    """An un-normalized model must come back exactly as sentence-transformers gives it (same norm)."""
    from sentence_transformers import SentenceTransformer

    from embedserve.settings import Settings
    from support import build_tiny_st_model, live_server

    folder = build_tiny_st_model(
        tmp_path / f"tiny-{pooling}", pooling=pooling, dense_out=None, normalize=False, seed=7
    )
    texts = ["short", "a somewhat longer input that needs padding in a batch", "中文 and émoji 🚀"]
    reference = SentenceTransformer(str(folder), device="cpu").encode(texts)
    with live_server(Settings(models=[f"tiny={folder}"])) as live:
        response = httpx.post(f"{live.v1}/embeddings", json={"model": "tiny", "input": texts})
    got = np.asarray([d["embedding"] for d in response.json()["data"]])
    assert np.allclose(got, reference, atol=1e-4)
