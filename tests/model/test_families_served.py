"""bge-m3 and Qwen3-Embedding served through the real loader (hub ids from the HF cache, and bare
folders), compared with the reference recipe computed straight from transformers as each model card
describes it. Mixed-length inputs everywhere, so that padding side and packing matter."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from conftest import API_KEY, FamilyModels
from embedserve.postprocess import min_cosine
from embedserve.settings import Settings
from support import VARIED_TEXTS as TEXTS
from support import LiveServer, live_server
from tiny_models import (
    QWEN3_DEFAULT_TASK,
    bge_m3_reference,
    qwen3_query,
    qwen3_reference,
    qwen3_reference_appending_eos,
    token_ids,
)

QUERIES = [
    "what is the capital of France",
    "how do vaccines work",
    "why is the sky blue when the sun is yellow and the air is clear",
]
QWEN3_DIMS = [64, 128, 256, 512, 768, 1024]


def embed(client: OpenAI, model: str, inputs: Any, **extra: Any) -> tuple[np.ndarray, int]:
    response = client.embeddings.create(model=model, input=inputs, extra_body=extra or None)
    assert [d.index for d in response.data] == list(range(len(response.data)))
    assert response.model == model
    return (np.array([d.embedding for d in response.data], dtype=np.float32), response.usage.prompt_tokens)


def post(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.v1}/embeddings", json=body, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}
    )


def assert_error(
    response: httpx.Response, status: int, code: str, param: str | None, *fragments: str
) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


# ---- bge-m3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["BAAI/bge-m3", "bge-m3"])
def test_bge_m3_matches_cls_and_normalize_from_transformers(
    family_client: OpenAI, family_models: FamilyModels, name: str
) -> None:
    served, tokens = embed(family_client, name, TEXTS)
    reference = bge_m3_reference(family_models.bge_m3, TEXTS)
    assert min_cosine(served, reference) >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert tokens == sum(len(ids) for ids in token_ids(family_models.bge_m3, TEXTS))


def test_bare_bge_m3_folder_gets_the_preset_from_its_name(
    family_client: OpenAI, family_models: FamilyModels
) -> None:
    served, _ = embed(family_client, "bge-m3-bare", TEXTS)
    assert min_cosine(served, bge_m3_reference(family_models.bge_m3_bare, TEXTS)) >= 0.9999


def test_bge_m3_inputs_in_concurrent_requests_match_the_single_batch_reference(
    family_client: OpenAI, family_models: FamilyModels
) -> None:
    with ThreadPoolExecutor(len(TEXTS)) as pool:
        rows = list(pool.map(lambda t: embed(family_client, "bge-m3", t)[0][0], TEXTS))
    assert min_cosine(np.stack(rows), bge_m3_reference(family_models.bge_m3, TEXTS)) >= 0.9999


def test_bge_m3_token_ids_give_the_texts_vectors(family_client: OpenAI, family_models: FamilyModels) -> None:
    ids = token_ids(family_models.bge_m3, TEXTS)
    served, tokens = embed(family_client, "bge-m3", ids)
    assert min_cosine(served, bge_m3_reference(family_models.bge_m3, TEXTS)) >= 0.9999
    assert tokens == sum(len(i) for i in ids)


def test_bge_m3_base64_is_the_float_vector(family_client: OpenAI) -> None:
    raw = family_client.embeddings.create(model="bge-m3", input=TEXTS[:2], encoding_format="base64")
    floats, _ = embed(family_client, "bge-m3", TEXTS[:2])
    decoded = np.stack([np.frombuffer(base64.b64decode(str(d.embedding)), dtype="<f4") for d in raw.data])
    np.testing.assert_array_equal(decoded, floats)


def test_bge_m3_queries_and_documents_are_embedded_alike(family_client: OpenAI) -> None:
    query, _ = embed(family_client, "bge-m3", QUERIES, input_type="query")
    document, _ = embed(family_client, "bge-m3", QUERIES, input_type="document")
    np.testing.assert_allclose(query, document, atol=1e-6)


def test_bge_m3_dimensions_is_400_saying_it_is_not_matryoshka(family_server: LiveServer) -> None:
    response = post(family_server, {"model": "bge-m3", "input": "hi", "dimensions": 16})
    assert_error(response, 400, "unsupported_dimensions", "dimensions", "not a Matryoshka model", "'bge-m3'")


def test_bge_m3_instruction_is_400(family_server: LiveServer) -> None:
    response = post(
        family_server, {"model": "bge-m3", "input": "hi", "input_type": "query", "instruction": "Find code"}
    )
    assert_error(response, 400, "invalid_instruction", "instruction", "takes no instruction")


def test_bge_m3_accepts_8192_tokens_and_refuses_8193(family_server: LiveServer) -> None:
    fits = post(family_server, {"model": "bge-m3", "input": [[0, *([5] * 8190), 2]]})
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["prompt_tokens"] == 8192
    over = post(family_server, {"model": "bge-m3", "input": [[0, *([5] * 8191), 2]]})
    assert_error(over, 400, "context_length_exceeded", "input", "8193 tokens", "at most 8192")


def test_bge_m3_model_card(family_server: LiveServer) -> None:
    card = httpx.get(
        f"{family_server.v1}/models/bge-m3", timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()
    assert card["id"] == "BAAI/bge-m3" and card["aliases"] == ["bge-m3"]
    assert (card["family"], card["max_input_tokens"], card["matryoshka_dimensions"]) == ("bge-m3", 8192, [])
    assert card["owned_by"] == "BAAI" and card["default_instruction"] is None
    assert card["input_types"] == ["query", "document"]


# ---- Qwen3-Embedding -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Qwen/Qwen3-Embedding-0.6B", "Qwen3-Embedding-0.6B"])
def test_qwen3_documents_match_left_padding_last_token_from_transformers(
    family_client: OpenAI, family_models: FamilyModels, name: str
) -> None:
    served, tokens = embed(family_client, name, TEXTS)
    assert min_cosine(served, qwen3_reference(family_models.qwen3, TEXTS)) >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert tokens == sum(len(ids) for ids in token_ids(family_models.qwen3, TEXTS))


def test_qwen3_queries_take_the_default_instruction(
    family_client: OpenAI, family_models: FamilyModels
) -> None:
    served, tokens = embed(family_client, "Qwen3-Embedding-0.6B", QUERIES, input_type="query")
    prompted = [qwen3_query(QWEN3_DEFAULT_TASK, q) for q in QUERIES]
    assert min_cosine(served, qwen3_reference(family_models.qwen3, prompted)) >= 0.9999
    assert tokens == sum(len(ids) for ids in token_ids(family_models.qwen3, prompted))
    plain, _ = embed(family_client, "Qwen3-Embedding-0.6B", QUERIES)
    assert min_cosine(served, plain) < 0.999  # the instruction changes the vector


def test_qwen3_queries_take_the_request_instruction(
    family_client: OpenAI, family_models: FamilyModels
) -> None:
    task = "Given a question, retrieve passages that answer it"
    served, _ = embed(family_client, "Qwen3-Embedding-0.6B", QUERIES, input_type="query", instruction=task)
    reference = qwen3_reference(family_models.qwen3, [qwen3_query(task, q) for q in QUERIES])
    assert min_cosine(served, reference) >= 0.9999


def test_qwen3_documents_take_no_instruction(family_client: OpenAI, family_models: FamilyModels) -> None:
    served, _ = embed(family_client, "Qwen3-Embedding-0.6B", TEXTS, input_type="document")
    assert min_cosine(served, qwen3_reference(family_models.qwen3, TEXTS)) >= 0.9999


@pytest.mark.parametrize("dimensions", QWEN3_DIMS)
def test_qwen3_dimensions_truncate_then_normalize(
    family_client: OpenAI, family_models: FamilyModels, dimensions: int
) -> None:
    response = family_client.embeddings.create(
        model="Qwen3-Embedding-0.6B", input=TEXTS, dimensions=dimensions
    )
    served = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert served.shape == (len(TEXTS), dimensions)
    reference = qwen3_reference(family_models.qwen3, TEXTS)[:, :dimensions]
    assert min_cosine(served, reference) >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("dimensions", [32, 100, 1000, 1536, 2048, 2560, 4096])
def test_qwen3_dimensions_outside_its_list_is_400_listing_them(
    family_server: LiveServer, dimensions: int
) -> None:
    response = post(family_server, {"model": "Qwen3-Embedding-0.6B", "input": "hi", "dimensions": dimensions})
    assert_error(response, 400, "unsupported_dimensions", "dimensions", str(QWEN3_DIMS), str(dimensions))


def test_qwen3_token_ids_with_and_without_eos_give_the_texts_vectors(
    family_client: OpenAI, family_models: FamilyModels
) -> None:
    ids = token_ids(family_models.qwen3, TEXTS)
    assert all(i[-1] == ids[0][-1] for i in ids)  # this tokenizer appends <|endoftext|>
    reference = qwen3_reference(family_models.qwen3, TEXTS)
    with_eos, tokens = embed(family_client, "Qwen3-Embedding-0.6B", ids)
    assert min_cosine(with_eos, reference) >= 0.9999 and tokens == sum(len(i) for i in ids)
    without_eos, tokens = embed(family_client, "Qwen3-Embedding-0.6B", [i[:-1] for i in ids])
    assert min_cosine(without_eos, reference) >= 0.9999
    assert tokens == sum(len(i) for i in ids)  # the appended EOS is embedded and counted


def test_qwen3_query_input_type_with_token_ids_is_400(family_server: LiveServer) -> None:
    response = post(
        family_server, {"model": "Qwen3-Embedding-0.6B", "input": [[5, 6, 7]], "input_type": "query"}
    )
    assert_error(response, 400, "invalid_input_type", "input_type", "token ids cannot take", "Instruct: ")


@pytest.mark.parametrize(
    ("extra", "code", "param", "fragment"),
    [
        ({"instruction": "Find code"}, "invalid_instruction", "instruction", "input_type 'query'"),
        (
            {"input_type": "document", "instruction": "Find code"},
            "invalid_instruction",
            "instruction",
            "input_type 'query'",
        ),
        ({"input_type": "passage_of_time"}, "invalid_input_type", "input_type", "['query', 'document']"),
        ({"input_type": 3}, "invalid_input_type", "input_type", "must be a string"),
        ({"input_type": "query", "instruction": ""}, "invalid_instruction", "instruction", "non-empty"),
        ({"input_type": "query", "instruction": ["a"]}, "invalid_instruction", "instruction", "non-empty"),
    ],
)
def test_bad_input_type_or_instruction_is_400_and_changes_nothing(
    family_server: LiveServer,
    family_client: OpenAI,
    extra: dict[str, Any],
    code: str,
    param: str,
    fragment: str,
) -> None:
    before, _ = embed(family_client, "Qwen3-Embedding-0.6B", QUERIES[:1])
    response = post(family_server, {"model": "Qwen3-Embedding-0.6B", "input": QUERIES[:1], **extra})
    assert_error(response, 400, code, param, fragment)
    after, _ = embed(family_client, "Qwen3-Embedding-0.6B", QUERIES[:1])
    np.testing.assert_array_equal(before, after)


def test_qwen3_tokenizer_without_eos_gets_it_appended(
    family_client: OpenAI, family_models: FamilyModels
) -> None:
    """The original release's tokenizer adds no EOS; its model card appended one by hand."""
    ids = token_ids(family_models.qwen3_no_eos, TEXTS)
    served, tokens = embed(family_client, "qwen3-no-eos", TEXTS)
    assert min_cosine(served, qwen3_reference_appending_eos(family_models.qwen3_no_eos, TEXTS)) >= 0.9999
    assert tokens == sum(len(i) + 1 for i in ids)
    from_ids, _ = embed(family_client, "qwen3-no-eos", ids)
    assert min_cosine(from_ids, served) >= 0.9999


def test_qwen3_model_card(family_server: LiveServer) -> None:
    card = httpx.get(
        f"{family_server.v1}/models/Qwen/Qwen3-Embedding-0.6B",
        timeout=30,
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    assert card["aliases"] == ["Qwen3-Embedding-0.6B"] and card["owned_by"] == "Qwen"
    assert (card["family"], card["dimensions"], card["max_input_tokens"]) == ("qwen3-embedding", 1024, 32768)
    assert card["matryoshka_dimensions"] == QWEN3_DIMS
    assert card["default_instruction"] == QWEN3_DEFAULT_TASK


# ---- sentence-transformers prompts through the same mechanism -------------------------------------


@pytest.mark.parametrize(
    ("input_type", "prompt_name"),
    [("query", "query"), ("document", "passage"), (None, "passage"), ("clustering", "clustering")],
)
def test_sentence_transformers_prompts_follow_input_type(
    family_client: OpenAI, st_model: Any, input_type: str | None, prompt_name: str
) -> None:
    prompts = {"query": "query: ", "passage": "passage: ", "clustering": "cluster: "}
    texts = [t for t in TEXTS if len(t) < 200]  # MiniLM takes 256 tokens
    extra = {"input_type": input_type} if input_type else {}
    served, tokens = embed(family_client, "minilm-prompted", texts, **extra)
    reference = st_model.encode(texts, prompt=prompts[prompt_name], normalize_embeddings=True)
    assert min_cosine(served, reference) >= 0.9999
    assert tokens == sum(len(st_model.tokenizer(prompts[prompt_name] + t)["input_ids"]) for t in texts)


def test_truncation_keeps_the_eos_last(family_models: FamilyModels, tmp_path: Path) -> None:
    """With --truncate, a Qwen3 input over the limit is cut and still ends with <|endoftext|>, as the
    tokenizer's own truncation does."""
    catalog = tmp_path / "models.toml"
    catalog.write_text(
        '[[models]]\nsource = "Qwen/Qwen3-Embedding-0.6B"\nmax_input_tokens = 64\n\n'
        f'[[models]]\nid = "qwen3-no-eos"\nsource = "{family_models.qwen3_no_eos}"\n'
        "max_input_tokens = 64\n"
    )
    long_text = TEXTS[4]
    with live_server(Settings(models_file=catalog, truncate=True)) as live:
        client = OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
        served, tokens = embed(client, "Qwen3-Embedding-0.6B", [long_text, "short"])
        assert tokens == 64 + len(token_ids(family_models.qwen3, ["short"])[0])
        reference = qwen3_reference(family_models.qwen3, [long_text, "short"], max_length=64)
        assert min_cosine(served, reference) >= 0.9999
        eos = token_ids(family_models.qwen3, ["x"])[0][-1]
        cut = [*token_ids(family_models.qwen3_no_eos, [long_text])[0][:63], eos]
        no_eos_text, tokens = embed(client, "qwen3-no-eos", [long_text])
        no_eos_ids, _ = embed(client, "qwen3-no-eos", [cut])
        assert tokens == 64 and min_cosine(no_eos_text, no_eos_ids) >= 0.9999


def test_dtype_and_device_choices(family_models: FamilyModels, tmp_path: Path) -> None:
    """bf16 on CPU serves close to the fp32 reference; `device = "cuda"` on a machine without CUDA marks
    that model failed (503 for its requests) while the other keeps serving."""
    import torch

    catalog = tmp_path / "models.toml"
    catalog.write_text(
        '[[models]]\nsource = "Qwen/Qwen3-Embedding-0.6B"\ndtype = "bfloat16"\n\n'
        '[[models]]\nid = "on-cuda"\nsource = "BAAI/bge-m3"\ndevice = "cuda"\n'
    )
    with live_server(Settings(models_file=catalog), wait_for="/health") as live:
        client = OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            cards = {c["id"]: c for c in httpx.get(f"{live.v1}/models", timeout=30).json()["data"]}
            if all(c["status"] != "loading" for c in cards.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert cards["Qwen/Qwen3-Embedding-0.6B"]["backend"] == "torch cpu bfloat16"
        served, _ = embed(client, "Qwen3-Embedding-0.6B", TEXTS)
        assert min_cosine(served, qwen3_reference(family_models.qwen3, TEXTS)) >= 0.99
        if not torch.cuda.is_available():
            assert cards["on-cuda"]["status"] == "failed"
            response = httpx.post(
                f"{live.v1}/embeddings", json={"model": "on-cuda", "input": "hi"}, timeout=30
            )
            assert response.status_code == 503
            assert "'on-cuda' failed to load" in response.json()["error"]["message"]
