"""embedserve.Engine, the pipeline as a library: the vectors, token counts and errors of the HTTP route
for the same inputs; concurrent callers batched together; closing drains the calls in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

import embedserve
from conftest import API_KEY, MAX_TOKENS_PER_REQUEST
from embedserve import Engine, EngineSync, Settings
from embedserve.backends.base import Backend
from embedserve.backends.fake import FakeBackend, fake_backends
from embedserve.errors import EmbedServeError, ModelLoadError, ModelNotFound, ShuttingDown
from embedserve.spec import ModelSpec
from embedserve.types import EmbeddingResult
from embedserve.validation import parse_embedding_request
from gates import GUARD_S, ONE, Gate, until
from support import LiveServer

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The cat sat on the mat.", "Embeddings map text to vectors.", "ünïcödé and emoji 🙂"]


@pytest.fixture(scope="module")
def engine_like_server(models_file: Path) -> Iterator[EngineSync]:
    """An engine on the settings of the session's live server (less its keys), called through the
    blocking facade (the async Engine underneath is what is compared)."""
    settings = Settings(models_file=models_file, max_tokens_per_request=MAX_TOKENS_PER_REQUEST)
    with EngineSync(Engine(settings)) as engine:
        yield engine


# ---- the same answers as the HTTP route ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "options"),
    [
        (MODEL, {}),
        ("minilm-mrl", {"dimensions": 128}),
        ("minilm-prompted", {"input_type": "query"}),
        ("tiny-cls-dense", {}),
    ],
)
def test_vectors_and_token_counts_equal_the_http_routes(
    engine_like_server: EngineSync, client: OpenAI, model: str, options: dict[str, Any]
) -> None:
    extra = {"input_type": options["input_type"]} if "input_type" in options else None
    dims = {"dimensions": options["dimensions"]} if "dimensions" in options else {}
    http = client.embeddings.create(model=model, input=TEXTS, extra_body=extra, **dims)
    result = engine_like_server.embed(model, TEXTS, **options)
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (len(TEXTS), len(http.data[0].embedding))
    np.testing.assert_array_equal(result.vectors, np.asarray([d.embedding for d in http.data], np.float32))
    assert result.total_tokens == http.usage.prompt_tokens
    assert result.model == model
    assert len(result.token_counts) == len(TEXTS) and all(n > 2 for n in result.token_counts)


@pytest.mark.parametrize(
    ("model", "options"),
    [(MODEL, {}), ("minilm-mrl", {"dimensions": 128}), ("minilm-prompted", {"input_type": "query"})],
)
def test_batch_class_work_gets_the_vectors_and_token_counts_of_online_work(
    engine_like_server: EngineSync, model: str, options: dict[str, Any]
) -> None:
    online = engine_like_server.embed(model, TEXTS, **options)
    batch = engine_like_server.embed(model, TEXTS, work="batch", **options)
    np.testing.assert_array_equal(batch.vectors, online.vectors)
    assert (batch.token_counts, batch.model) == (online.token_counts, online.model)


def test_token_id_inputs_python_or_numpy_equal_the_http_routes(
    engine_like_server: EngineSync, client: OpenAI
) -> None:
    ids = [[101, 7592, 2088, 102], [101, 2088, 102]]
    http = client.embeddings.create(model=MODEL, input=ids)
    expected = np.asarray([d.embedding for d in http.data], np.float32)
    for given in (ids, [np.asarray(row) for row in ids], [tuple(row) for row in ids]):
        result = engine_like_server.embed(MODEL, given)
        np.testing.assert_array_equal(result.vectors, expected)
        assert result.token_counts == (4, 3)


@pytest.mark.parametrize(
    ("model", "inputs", "options"),
    [
        (MODEL, "", {}),
        (MODEL, [], {}),
        (MODEL, ["text", 7], {}),
        (MODEL, ["fine", ""], {}),
        (MODEL, [[101, -3, 102]], {}),
        (MODEL, [[101, 10**9, 102]], {}),
        (MODEL, "x", {"dimensions": 0}),
        (MODEL, "x", {"dimensions": 100}),
        ("minilm-mrl", "x", {"dimensions": 100}),
        (MODEL, "x", {"input_type": "nonsense"}),
        (MODEL, "x", {"instruction": "  "}),
        (MODEL, "word " * 400, {}),
        (MODEL, ["word " * 100] * 300, {}),
        ("no-such-model", "x", {}),
    ],
    ids=lambda v: repr(v)[:24],
)
def test_bad_inputs_raise_the_error_the_http_route_answers(
    engine_like_server: EngineSync, server: LiveServer, model: str, inputs: Any, options: dict[str, Any]
) -> None:
    response = httpx.post(
        f"{server.v1}/embeddings",
        json={"model": model, "input": inputs, **options},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert 400 <= response.status_code < 500
    with pytest.raises(EmbedServeError) as raised:
        engine_like_server.embed(model, inputs, **options)
    exc = raised.value
    assert (exc.status, exc.type, exc.code, exc.param, exc.message) == (
        response.status_code,
        *(response.json()["error"][k] for k in ("type", "code", "param", "message")),
    )
    # and the engine still serves
    assert engine_like_server.embed(MODEL, "still here").vectors.shape == (1, 384)


# ---- batching and closing, on fake backends (the pipeline and tokenizers stay real) -----------------------


def fake_backend_of(engine: Engine, model: str = MODEL) -> FakeBackend:
    backend = engine.registry.runtime(engine.catalog.resolve(model)).backend
    assert isinstance(backend, FakeBackend)
    return backend


def test_concurrent_callers_are_batched_together_and_each_gets_its_own_vector() -> None:
    """While the model is busy (a pass held at the gate), the callers that arrive queue, and go to the
    model together once it is free, each with the vector its text gets alone. (Texts of one length: on
    CPU the batcher keeps inputs of unlike lengths apart, and lets no single-input caller be overtaken.)"""
    gate = Gate()
    texts = [f"caller number {i} says hello" for i in range(10, 50)]

    async def run() -> tuple[list[embedserve.Embeddings], list[int], list[Any]]:
        async with Engine.open(backends=gate.backends(fake_backends())) as engine:
            backend = fake_backend_of(engine)
            runtime = engine.registry.runtime(engine.catalog.resolve(MODEL))
            lengths = {len(ids) for ids in runtime.tokenizer.encode_sync(texts)}
            assert len(lengths) == 1
            tokens = len(texts) * lengths.pop()
            gate.armed = True
            first = asyncio.ensure_future(engine.embed(MODEL, "the model is busy with this"))
            assert await asyncio.to_thread(gate.entered.wait, GUARD_S)
            before = len(backend.batches)
            calls = asyncio.gather(*(engine.embed(MODEL, text) for text in texts))
            await until(lambda: runtime.batcher.queued_tokens >= tokens, "all are queued for the model")
            gate.opened.set()
            results, _ = await asyncio.gather(calls, first)
            alone = [backend.reference(ids) for ids in runtime.tokenizer.encode_sync(texts)]
            return list(results), [rows for rows, _ in backend.batches[before:]], alone

    results, rows, alone = asyncio.run(run())
    # The busy pass, then the 40 in as few passes as the CPU pass budget (256 tokens: 36 of them) allows.
    assert rows[0] == 1 and sum(rows[1:]) == len(texts) and len(rows[1:]) <= 2, rows
    for result, reference in zip(results, alone, strict=True):
        expected = reference / np.linalg.norm(reference)
        np.testing.assert_allclose(result.vectors[0], expected, rtol=1e-5, atol=1e-6)


def test_a_batch_job_run_through_the_engine_waits_for_online_calls_and_gets_their_vectors() -> None:
    """`Engine.run(job, work="batch")`, as the batch worker calls it: queued while the model is busy, it
    is neither counted nor refused by the online queue's bounds (8 inputs here), and the online calls
    that arrive after it go to the model first, in passes of their own; every text of the job gets the
    vector it gets alone."""
    gate = Gate()
    batch_texts = [f"a batch line's text number {i}" for i in range(10, 22)]
    online_texts = [f"an online caller's text {i}" for i in range(10, 14)]

    async def run() -> tuple[EmbeddingResult, list[list[str]], list[Any]]:
        async with Engine.open(
            backends=gate.backends(fake_backends()), max_queued_inputs=8, max_inputs_per_request=8, **ONE
        ) as engine:
            runtime, backend = engine.registry.runtime(engine.catalog.resolve(MODEL)), fake_backend_of(engine)
            gate.armed = True
            first = asyncio.ensure_future(engine.embed(MODEL, "the model is busy with this"))
            assert await asyncio.to_thread(gate.entered.wait, GUARD_S)
            before = len(backend.batches)
            job = parse_embedding_request({"model": MODEL, "input": batch_texts}, max_inputs=2048)
            background = asyncio.ensure_future(engine.run(job, work="batch"))
            await until(lambda: runtime.batcher.queue_depth("batch") == len(batch_texts), "the job is queued")
            assert runtime.batcher.queue_depth() == 0 and runtime.batcher.queued_tokens == 0
            calls = asyncio.gather(*(engine.embed(MODEL, [text, text]) for text in online_texts))
            await until(lambda: runtime.batcher.queue_depth() == 8, "the online calls are queued")
            gate.opened.set()
            _, batch, _ = await asyncio.gather(calls, background, first)
            encode = runtime.tokenizer.encode_sync
            kind = {tuple(ids): "online" for ids in encode(online_texts)}
            kind.update({tuple(ids): "batch" for ids in encode(batch_texts)})
            # Each row of each pass from the busy one on (recorded once past the gate), in order.
            rows = iter(gate.seen)
            passes = [[tuple(next(rows)) for _ in range(n)] for n, _ in backend.batches[before:]]
            passes = [[kind[ids] for ids in rows_of] for rows_of in passes[1:]]
            return batch, passes, [backend.reference(ids) for ids in encode(batch_texts)]

    batch, passes, alone = asyncio.run(run())
    assert all(set(rows) == {rows[0]} for rows in passes), f"a pass mixed the classes: {passes}"
    kinds = [rows[0] for rows in passes]
    assert kinds == ["online"] * kinds.count("online") + ["batch"] * kinds.count("batch"), kinds
    assert sum(map(len, passes)) == 2 * len(online_texts) + len(batch_texts)
    for vector, reference in zip(batch.vectors, alone, strict=True):
        np.testing.assert_allclose(vector, reference / np.linalg.norm(reference), rtol=1e-5, atol=1e-6)


def test_closing_lets_the_calls_in_flight_finish_and_refuses_new_ones() -> None:
    gate = Gate()

    async def run() -> None:
        engine = Engine.open(backends=gate.backends(fake_backends()))
        await engine.__aenter__()
        gate.armed = True
        calls = [asyncio.ensure_future(engine.embed(MODEL, [f"in flight {i}"] * 3)) for i in range(6)]
        assert await asyncio.to_thread(gate.entered.wait, GUARD_S)
        closing = asyncio.ensure_future(engine.close())
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDown) as refused:
            await engine.embed(MODEL, "too late")
        assert refused.value.status == 503 and refused.value.code == "shutting_down"
        assert not closing.done() and engine.in_flight == 6
        gate.opened.set()
        results = await asyncio.gather(*calls)
        await closing
        assert [r.vectors.shape for r in results] == [(3, 384)] * 6
        assert engine.in_flight == 0

    asyncio.run(run())


def test_an_engine_used_without_async_with_loads_its_models_on_the_first_call() -> None:
    async def run() -> tuple[int, int]:
        engine = Engine.open(backends=fake_backends())
        try:
            return (await engine.embed(MODEL, ["loaded on demand", "x"])).vectors.shape
        finally:
            await engine.close()

    assert asyncio.run(run()) == (2, 384)


def test_a_model_that_fails_to_load_fails_the_engine_naming_it() -> None:
    def broken(spec: ModelSpec, settings: Settings) -> Backend:
        raise ModelLoadError("weights are corrupt (simulated)")

    async def run() -> None:
        async with Engine.open(backends=broken):
            raise AssertionError("an engine whose model failed must not open")

    with pytest.raises(ModelLoadError, match=rf"{MODEL}: failed \(weights are corrupt \(simulated\)\)"):
        asyncio.run(run())


def test_a_model_that_cannot_be_found_is_one_clear_error_at_open(tmp_path: Path) -> None:
    with pytest.raises(EmbedServeError) as raised:
        Engine.open([str(tmp_path / "missing-model")])
    assert str(tmp_path / "missing-model") in raised.value.message
    assert "\n" not in raised.value.message


def test_an_unknown_model_is_model_not_found_listing_what_is_served() -> None:
    async def run() -> None:
        async with Engine.open(backends=fake_backends()) as engine:
            await engine.embed("text-embedding-3-small", "x")

    with pytest.raises(ModelNotFound, match=f"Models you may use: {MODEL}."):
        asyncio.run(run())


def test_settings_are_the_servers_and_reach_the_pipeline() -> None:
    async def run() -> tuple[embedserve.Embeddings, embedserve.Embeddings]:
        long = "word " * 1000
        async with Engine.open(backends=fake_backends(), truncate=True) as truncating:
            cut = await truncating.embed(MODEL, long)
        async with Engine.open(
            backends=fake_backends(), aliases=["text-embedding-3-small=all-MiniLM-L6-v2"]
        ) as aliased:
            named = await aliased.embed("text-embedding-3-small", "x")
        return cut, named

    cut, named = asyncio.run(run())
    assert cut.token_counts == (256,)  # the model's limit, as --truncate does on the server
    assert named.model == MODEL
