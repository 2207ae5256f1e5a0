"""The whole app on fake backends (real tokenizers, pipeline, keys, limits and ledger; no weights): the
official client's vectors are the engine's, usage is billed per key, and bad input changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from embedserve import Engine, Settings
from embedserve.backends.fake import fake_backends
from gates import wait_until
from support import LiveServer, live_server, private_data_dir

MODEL = "all-MiniLM-L6-v2"
ADMIN = "sk-fake-stack-admin"


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = private_data_dir(tmp_path_factory.mktemp("fake-stack") / "data")
    settings = Settings(data_dir=data_dir, admin_keys=[ADMIN], usage_flush_interval=0.05)
    with live_server(settings, backends=fake_backends()) as live:
        yield live


@pytest.fixture(scope="module")
def limited_key(fake_server: LiveServer) -> str:
    created = httpx.post(
        f"{fake_server.v1}/keys",
        json={"name": "fake-stack", "tpm": 200},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert created.status_code == 201, created.text
    key: str = created.json()["key"]
    return key


def engine_vectors(texts: list[str]) -> np.ndarray:
    async def run() -> np.ndarray:
        async with Engine.open(backends=fake_backends()) as engine:
            return (await engine.embed(MODEL, texts)).vectors

    return asyncio.run(run())


def test_the_clients_vectors_are_the_engines(fake_server: LiveServer, limited_key: str) -> None:
    texts = ["a first text", "and a second, longer one"]
    client = OpenAI(base_url=fake_server.v1, api_key=limited_key, max_retries=0)
    response = client.embeddings.create(model=MODEL, input=texts)
    got = np.asarray([d.embedding for d in response.data], dtype=np.float32)
    np.testing.assert_array_equal(got, engine_vectors(texts))
    assert response.usage.prompt_tokens > 0


def test_usage_is_recorded_for_the_key_and_a_refusal_bills_nothing(
    fake_server: LiveServer, limited_key: str
) -> None:
    client = OpenAI(base_url=fake_server.v1, api_key=limited_key, max_retries=0)
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def billed() -> int:
        report = httpx.get(f"{fake_server.v1}/usage", params={"group_by": "key"}, headers=admin).json()
        return sum(row["prompt_tokens"] for row in report["data"] if row.get("key_name") == "fake-stack")

    def settled() -> int:
        """The key's billed tokens once the ledger has written every record made so far (a record is
        made before its response is sent)."""
        wait_until(lambda: fake_server.state.ledger.pending == 0, "the ledger has flushed")
        return billed()

    before = settled()
    sent = client.embeddings.create(model=MODEL, input="counted once").usage.prompt_tokens
    with pytest.raises(openai.RateLimitError) as refused:
        client.embeddings.create(model=MODEL, input="word " * 250)  # past the key's 200 tokens a minute
    assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=[""])
    assert settled() == before + sent
    assert client.embeddings.create(model=MODEL, input="still served").data
