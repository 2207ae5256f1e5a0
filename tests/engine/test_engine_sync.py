"""EngineSync, the engine for scripts and notebooks: blocking calls, safe from many threads (whose
calls are batched together), usable where an event loop already runs, closed once."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from embedserve import Engine, EngineSync
from embedserve.backends.fake import FakeBackend, fake_backends
from embedserve.errors import InvalidRequest, ShuttingDown, UnsupportedOutput
from gates import GUARD_S, Gate, wait_until

MODEL = "all-MiniLM-L6-v2"


def test_calls_from_many_threads_are_batched_together_and_equal_the_async_engines() -> None:
    gate = Gate()
    texts = [f"thread {i} asks about things" for i in range(10, 18)]  # one length: see test_engine
    with EngineSync.open(backends=gate.backends(fake_backends())) as engine:
        gate.armed = True
        with ThreadPoolExecutor(len(texts) + 1) as threads:
            first = threads.submit(engine.embed, MODEL, "the first holds the model")
            assert gate.entered.wait(GUARD_S)
            runtime = engine.engine.registry.runtime(engine.engine.catalog.resolve(MODEL))
            tokens = sum(len(ids) for ids in runtime.tokenizer.encode_sync(texts))
            rest = [threads.submit(engine.embed, MODEL, text) for text in texts]
            wait_until(lambda: runtime.batcher.queued_tokens >= tokens, "all are queued behind the held pass")
            gate.opened.set()
            results = [future.result(GUARD_S) for future in rest]
            first.result(GUARD_S)
        backend = runtime.backend
        assert isinstance(backend, FakeBackend)
        rows = [rows for rows, _ in backend.batches[-2:]]
        assert max(rows) == len(texts), f"the threads' calls did not share a batch: {rows}"

    async def reference() -> list[np.ndarray]:
        async with Engine.open(backends=fake_backends()) as plain:
            return [(await plain.embed(MODEL, text)).vectors for text in texts]

    for result, expected in zip(results, asyncio.run(reference()), strict=True):
        np.testing.assert_allclose(result.vectors, expected, rtol=1e-5, atol=1e-6)


def test_it_works_inside_a_running_event_loop() -> None:
    async def notebook_cell() -> tuple[int, int]:
        with EngineSync.open(backends=fake_backends()) as engine:
            return engine.embed(MODEL, ["a", "b"]).vectors.shape

    assert asyncio.run(notebook_cell()) == (2, 384)


def test_errors_are_the_engines_and_it_serves_after_them() -> None:
    with EngineSync.open(backends=fake_backends()) as engine:
        with pytest.raises(InvalidRequest) as raised:
            engine.embed(MODEL, [])
        assert raised.value.param == "input" and raised.value.code == "empty_input"
        assert engine.embed(MODEL, "after").vectors.shape == (1, 384)


def test_after_close_calls_are_refused_and_closing_again_is_harmless() -> None:
    engine = EngineSync.open(backends=fake_backends())
    engine.close()
    engine.close()
    with pytest.raises(ShuttingDown):
        engine.embed(MODEL, "x")


def test_the_outputs_and_the_output_dtype_reach_the_engine() -> None:
    with EngineSync.open(backends=fake_backends()) as engine:
        packed = engine.embed(MODEL, "a text", output_dtype="ubinary")
        assert packed.packed is not None and packed.packed.shape == (1, 384 // 8)
        assert np.array_equal(packed.packed, np.packbits(packed.vectors > 0, axis=-1))
        with pytest.raises(UnsupportedOutput) as raised:
            engine.embed(MODEL, "a text", outputs=["sparse"])
        assert raised.value.param == "outputs" and "['dense']" in raised.value.message
