"""embedserve.scheduler.batcher with the fake backend: every caller gets exactly its own vectors, in order;
batches stay within their limits and mix requests; cancelled items never reach the model; failures and
shutdown answer every caller."""

from __future__ import annotations

import asyncio
import queue
import random
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from embedserve.backends.fake import FakeBackend
from embedserve.errors import InternalError, Overloaded, ServiceUnavailable
from embedserve.metrics import Metrics
from embedserve.scheduler.batcher import Batcher
from embedserve.scheduler.memory import MemoryBudget, MemoryModel
from embedserve.scheduler.packing import CPU_MAX_PADDING, MAX_PADDING, BatchLimits
from embedserve.types import FloatMatrix, PaddingSide, TokenBatch

SEED = 0
GUARD_S = 10.0  # upper bound on waits that must not hang the suite; never a timing assertion
ANSWER_S = 2.0  # bound on a wait for a caller that close() must already have answered


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


_REFERENCE = FakeBackend(seed=SEED)


def reference(ids: list[int]) -> FloatMatrix:
    return _REFERENCE.reference(ids)


def assert_own_vectors(sequences: list[list[int]], vectors: FloatMatrix) -> None:
    assert vectors.shape == (len(sequences), 16)
    for ids, vector in zip(sequences, vectors, strict=True):
        assert np.allclose(vector, reference(ids), atol=1e-5), f"wrong vector for ids {ids}"


class RecordingBackend(FakeBackend):
    """Also records the real ids of every row of every forward pass."""

    def __init__(self, workers: int = 1) -> None:
        super().__init__(seed=SEED, workers=workers)
        self.rows: list[list[int]] = []

    def forward(self, batch: TokenBatch) -> FloatMatrix:
        for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
            self.rows.append([int(t) for t in ids[mask.astype(bool)]])
        return super().forward(batch)


class GatedBackend(RecordingBackend):
    """The first forward pass signals `started`, then blocks until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()
        self._first = True

    def forward(self, batch: TokenBatch) -> FloatMatrix:
        if self._first:
            self._first = False
            self.started.set()
            self.release.wait(GUARD_S)
        return super().forward(batch)


class FailingBackend(RecordingBackend):
    """Raises on any batch holding the token id `poison`."""

    def __init__(self, poison: int) -> None:
        super().__init__()
        self.poison = poison

    def forward(self, batch: TokenBatch) -> FloatMatrix:
        if (batch.input_ids[batch.attention_mask.astype(bool)] == self.poison).any():
            raise RuntimeError("device fell over")
        return super().forward(batch)


@asynccontextmanager
async def started(
    backend: FakeBackend,
    *,
    max_batch_tokens: int = 4096,
    max_batch_items: int = 64,
    padding_side: PaddingSide = "right",
    pad_id: int = 0,
    max_batch_wait_ms: float = 0.0,
    max_padding: float = MAX_PADDING,
    **options: Any,
) -> AsyncIterator[Batcher]:
    """`options`: the batcher's admission and memory settings (max_queued, max_queue_wait_s,
    tokens_per_s, memory, budget)."""
    batcher = Batcher(
        "fake",
        backend,
        pad_id=pad_id,
        padding_side=padding_side,
        limits=BatchLimits(
            max_tokens=max_batch_tokens, max_wait_ms=max_batch_wait_ms, max_padding=max_padding
        ),
        max_batch_items=max_batch_items,
        **options,
    )
    batcher.start()
    try:
        yield batcher
    finally:
        if isinstance(backend, GatedBackend):
            backend.release.set()  # close() waits for the executor thread
        await batcher.close()


async def forward_started(backend: GatedBackend) -> None:
    assert await asyncio.to_thread(backend.started.wait, GUARD_S), "the first forward never started"


async def handed_over() -> None:
    """Let just-created tasks queue their inputs and the batcher hand them to the model thread (it does
    so at the end of the loop turn they arrived in): a few turns of the event loop, no timing."""
    for _ in range(3):
        await asyncio.sleep(0)


def random_sequences(rng: random.Random, count: int, *, max_len: int = 40) -> list[list[int]]:
    return [[rng.randrange(1, 1000) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


# ---- correctness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize(("padding_side", "pad_id"), [("right", 0), ("left", 0), ("left", 3)])
def test_concurrent_callers_each_get_exactly_their_own_vectors(
    padding_side: PaddingSide, pad_id: int, workers: int
) -> None:
    async def main() -> None:
        rng = random.Random(1)
        requests = [random_sequences(rng, rng.randint(1, 6)) for _ in range(60)]
        async with started(
            FakeBackend(seed=SEED, workers=workers),
            max_batch_tokens=512,
            max_batch_items=16,
            padding_side=padding_side,
            pad_id=pad_id,
        ) as batcher:
            results = await asyncio.gather(*(batcher.embed(seqs) for seqs in requests))
        for seqs, vectors in zip(requests, results, strict=True):
            assert_own_vectors(seqs, vectors)

    run(main())


@pytest.mark.parametrize("workers", [1, 2])
def test_one_call_with_2048_sequences_returns_them_in_order(workers: int) -> None:
    async def main() -> None:
        rng = random.Random(2)
        sequences = random_sequences(rng, 2048, max_len=64)
        backend = FakeBackend(seed=SEED, workers=workers)
        async with started(backend, max_batch_tokens=2048, max_batch_items=64) as batcher:
            vectors = await batcher.embed(sequences)
        assert_own_vectors(sequences, vectors)
        assert vectors.dtype == np.float32
        assert sum(rows for rows, _ in backend.batches) == 2048

    run(main())


class MeetingBackend(RecordingBackend):
    """Every forward pass waits (bounded) until `parties` passes are running at once: it completes only
    if the batcher really runs that many side by side, and raises otherwise."""

    def __init__(self, workers: int, parties: int, timeout_s: float = GUARD_S) -> None:
        super().__init__(workers=workers)
        self.barrier = threading.Barrier(parties, timeout=timeout_s)

    def forward(self, batch: TokenBatch) -> FloatMatrix:
        self.barrier.wait()
        return super().forward(batch)


@pytest.mark.parametrize("workers", [2, 3])
def test_each_worker_runs_its_own_batch_at_the_same_time(workers: int) -> None:
    async def main() -> None:
        backend = MeetingBackend(workers=workers, parties=workers)
        sequences = [[i + 1] for i in range(4 * workers)]
        async with started(backend, max_batch_items=1) as batcher:
            results = await asyncio.gather(*(batcher.embed([seq]) for seq in sequences))
        for seq, vectors in zip(sequences, results, strict=True):
            assert_own_vectors([seq], vectors)
        assert sorted(backend.rows) == sorted(sequences)

    run(main())


def test_one_worker_never_runs_two_batches_at_once() -> None:
    """The same meeting with one worker cannot happen: both callers get InternalError (the barrier
    times out) rather than vectors. This is what makes the test above able to fail."""

    async def main() -> None:
        backend = MeetingBackend(workers=1, parties=2, timeout_s=0.2)
        async with started(backend, max_batch_items=1) as batcher:
            results = await asyncio.gather(batcher.embed([[1]]), batcher.embed([[2]]), return_exceptions=True)
        assert all(isinstance(result, InternalError) for result in results)

    run(main())


def test_identical_inputs_in_different_requests_get_identical_vectors() -> None:
    async def main() -> None:
        async with started(FakeBackend(seed=SEED)) as batcher:
            a, b = await asyncio.gather(batcher.embed([[5, 6, 7]]), batcher.embed([[1], [5, 6, 7]]))
        np.testing.assert_array_equal(a[0], b[1])

    run(main())


@pytest.mark.parametrize(("max_batch_tokens", "max_batch_items"), [(256, 8), (1024, 64), (64, 3), (40, 100)])
def test_batches_respect_the_item_and_token_limits(max_batch_tokens: int, max_batch_items: int) -> None:
    async def main() -> None:
        rng = random.Random(max_batch_tokens)
        requests = [random_sequences(rng, rng.randint(1, 10), max_len=50) for _ in range(30)]
        backend = FakeBackend(seed=SEED)
        async with started(
            backend, max_batch_tokens=max_batch_tokens, max_batch_items=max_batch_items
        ) as batcher:
            results = await asyncio.gather(*(batcher.embed(seqs) for seqs in requests))
        for seqs, vectors in zip(requests, results, strict=True):
            assert_own_vectors(seqs, vectors)
        assert backend.batches
        for rows, padded_len in backend.batches:
            assert rows <= max_batch_items
            assert rows * padded_len <= max_batch_tokens or rows == 1
        assert sum(rows for rows, _ in backend.batches) == sum(map(len, requests))

    run(main())


@pytest.mark.parametrize("max_padding", [CPU_MAX_PADDING, MAX_PADDING])
def test_batches_of_several_inputs_stay_within_the_padding_tolerance(max_padding: float) -> None:
    async def main() -> None:
        rng = random.Random(11)
        requests = [random_sequences(rng, 32, max_len=250) for _ in range(4)]
        backend = FakeBackend(seed=SEED)
        async with started(backend, max_padding=max_padding) as batcher:
            results = await asyncio.gather(*(batcher.embed(seqs) for seqs in requests))
        for seqs, vectors in zip(requests, results, strict=True):
            assert_own_vectors(seqs, vectors)
        for (rows, padded_len), real in zip(backend.batches, backend.real_tokens, strict=True):
            assert rows == 1 or rows * padded_len <= (1 + max_padding) * real

    run(main())


def test_items_of_requests_that_arrive_together_share_a_forward_pass() -> None:
    async def main() -> None:
        backend = GatedBackend()
        async with started(backend, max_batch_tokens=4096, max_batch_items=64) as batcher:
            first = asyncio.create_task(batcher.embed([[1, 2, 3]]))
            await forward_started(backend)
            requests = [[[10 + i, 20 + i]] for i in range(20)]
            tasks = [asyncio.create_task(batcher.embed(seqs)) for seqs in requests]
            await asyncio.sleep(0)  # let every task queue its items
            assert batcher.queue_depth() == 20
            backend.release.set()
            results = await asyncio.gather(*tasks)
            await first
        for seqs, vectors in zip(requests, results, strict=True):
            assert_own_vectors(seqs, vectors)
        assert len(backend.batches) == 2, "one forward for the first request, one for the 20 others"
        assert backend.batches[1][0] == 20

    run(main())


# ---- cancellation, failure, shutdown -------------------------------------------------------------


def test_a_cancelled_callers_items_never_reach_the_backend() -> None:
    async def main() -> None:
        backend = GatedBackend()
        async with started(backend) as batcher:
            a = asyncio.create_task(batcher.embed([[1, 2, 3], [4, 5]]))
            await forward_started(backend)
            b = asyncio.create_task(batcher.embed([[777, 777], [777]]))
            await asyncio.sleep(0)
            assert batcher.queue_depth() == 2
            b.cancel()
            with pytest.raises(asyncio.CancelledError):
                await b
            backend.release.set()
            assert_own_vectors([[1, 2, 3], [4, 5]], await a)
            c = await batcher.embed([[8, 9]])  # the batcher goes on serving
            assert_own_vectors([[8, 9]], c)
            assert batcher.queue_depth() == 0
        assert all(777 not in row for row in backend.rows)
        assert sorted(backend.rows) == sorted([[1, 2, 3], [4, 5], [8, 9]])

    run(main())


def test_a_failing_forward_pass_gives_its_callers_internal_error_and_serving_goes_on() -> None:
    async def main() -> None:
        backend = FailingBackend(poison=666)
        async with started(backend) as batcher:
            with pytest.raises(InternalError) as info:
                await batcher.embed([[1, 666, 2]])
            assert info.value.status == 500
            vectors = await batcher.embed([[1, 2], [3]])
            assert_own_vectors([[1, 2], [3]], vectors)

    run(main())


def test_every_caller_sharing_a_failed_batch_gets_internal_error() -> None:
    async def main() -> None:
        backend = FailingBackend(poison=666)
        async with started(backend) as batcher:
            outcomes = await asyncio.gather(
                batcher.embed([[666, 7]]), batcher.embed([[5, 6]]), return_exceptions=True
            )
            assert all(isinstance(outcome, InternalError) for outcome in outcomes)
            assert_own_vectors([[5, 6]], await batcher.embed([[5, 6]]))

    run(main())


def test_close_fails_waiting_items_with_service_unavailable() -> None:
    async def main() -> None:
        backend = GatedBackend()
        batcher = Batcher(
            "fake",
            backend,
            pad_id=0,
            padding_side="right",
            max_batch_items=64,
            limits=BatchLimits(max_tokens=4096, max_wait_ms=0.0, max_padding=MAX_PADDING),
        )
        batcher.start()
        running = asyncio.create_task(batcher.embed([[1, 2]]))
        await forward_started(backend)
        waiting = asyncio.create_task(batcher.embed([[3, 4], [5]]))
        await asyncio.sleep(0)
        assert batcher.queue_depth() == 2
        closing = asyncio.create_task(batcher.close())  # closes at once, then waits for the running batch
        await asyncio.sleep(0)
        backend.release.set()
        await asyncio.wait_for(closing, GUARD_S)
        try:
            done, _ = await asyncio.wait({waiting}, timeout=ANSWER_S)
            assert waiting in done, "a waiting caller was never answered after close()"
            with pytest.raises(ServiceUnavailable) as info:
                waiting.result()
            assert info.value.status == 503
            assert info.value.headers()["Retry-After"]
            assert batcher.queue_depth() == 0
            assert all(3 not in row and 5 not in row for row in backend.rows)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    run(main())


def test_close_answers_the_caller_whose_batch_is_running() -> None:
    async def main() -> None:
        backend = GatedBackend()
        batcher = Batcher(
            "fake",
            backend,
            pad_id=0,
            padding_side="right",
            max_batch_items=64,
            limits=BatchLimits(max_tokens=4096, max_wait_ms=0.0, max_padding=MAX_PADDING),
        )
        batcher.start()
        running = asyncio.create_task(batcher.embed([[1, 2]]))
        await forward_started(backend)
        backend.release.set()
        await batcher.close()
        try:
            done, _ = await asyncio.wait({running}, timeout=ANSWER_S)
            assert running in done, "the caller whose batch was on the executor is never answered"
            if running.exception() is not None:  # failing it or finishing it are both fine; hanging is not
                assert isinstance(running.exception(), ServiceUnavailable)
            else:
                assert_own_vectors([[1, 2]], running.result())
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    run(main())


def test_embed_after_close_is_service_unavailable() -> None:
    async def main() -> None:
        async with started(FakeBackend(seed=SEED)) as batcher:
            await batcher.embed([[1]])
        with pytest.raises(ServiceUnavailable):
            await batcher.embed([[1]])

    run(main())


# ---- bounded wait under load ---------------------------------------------------------------------


def test_under_load_a_batch_waits_for_inputs_on_their_way() -> None:
    """A runs; B arrives meanwhile; when A is done, C comes right after. With a wait, B and C share a
    forward pass (the batch fills up, so nothing waits for the deadline)."""

    async def main() -> None:
        backend = GatedBackend()
        async with started(backend, max_batch_items=2, max_batch_wait_ms=GUARD_S * 1000) as batcher:
            a = asyncio.ensure_future(batcher.embed([[1]]))
            await forward_started(backend)
            b = asyncio.ensure_future(batcher.embed([[2]]))
            await handed_over()  # B waits while A runs: under load when A is done
            backend.release.set()
            await asyncio.wait_for(a, GUARD_S)
            c = await asyncio.wait_for(batcher.embed([[3]]), GUARD_S)
            await asyncio.wait_for(b, GUARD_S)
            assert_own_vectors([[3]], c)
        assert backend.rows == [[1], [2], [3]]
        assert [rows for rows, _ in backend.batches] == [1, 2]

    run(main())


def test_without_a_wait_the_next_batch_starts_as_soon_as_the_model_is_free() -> None:
    """A runs; B arrives meanwhile; nothing else comes. B is served right after A, alone."""

    async def main() -> None:
        backend = GatedBackend()
        async with started(backend, max_batch_items=2, max_batch_wait_ms=0.0) as batcher:
            a = asyncio.ensure_future(batcher.embed([[1]]))
            await forward_started(backend)
            b = asyncio.ensure_future(batcher.embed([[2]]))
            await asyncio.sleep(0)
            backend.release.set()
            assert_own_vectors([[2]], await asyncio.wait_for(b, ANSWER_S))
            await a
        assert [rows for rows, _ in backend.batches] == [1, 1]

    run(main())


def test_the_model_thread_starts_the_next_batch_without_the_event_loop() -> None:
    """The event loop can be busy (HTTP, rendering) while the model goes from one batch to the next: B
    starts while the loop is blocked (a loop-driven batcher would wait for it, and this would time out)."""

    class SecondSignals(GatedBackend):
        def __init__(self) -> None:
            super().__init__()
            self.second = threading.Event()

        def forward(self, batch: TokenBatch) -> FloatMatrix:
            if not self._first:
                self.second.set()
            return super().forward(batch)

    async def main() -> None:
        backend = SecondSignals()
        async with started(backend) as batcher:
            a = asyncio.ensure_future(batcher.embed([[1]]))
            await forward_started(backend)
            b = asyncio.ensure_future(batcher.embed([[2]]))
            await handed_over()
            backend.release.set()
            # A blocking wait: the event loop is stuck here until the model thread starts B by itself.
            assert backend.second.wait(GUARD_S), "the second batch waited for the event loop"
            assert_own_vectors([[1]], await a)
            assert_own_vectors([[2]], await b)

    run(main())


@pytest.mark.parametrize("sequential", [1, 3])
def test_an_idle_queue_never_waits(sequential: int) -> None:
    """With a 10 s wait configured, a lone caller (and each next one after its answer) is served at
    once: the wait applies only when a batch has just run and inputs are already waiting."""

    async def main() -> None:
        async with started(FakeBackend(seed=SEED), max_batch_wait_ms=GUARD_S * 1000) as batcher:
            for i in range(sequential):
                vectors = await asyncio.wait_for(batcher.embed([[i + 1, 7]]), ANSWER_S)
                assert_own_vectors([[i + 1, 7]], vectors)

    run(main())


# ---- admission -----------------------------------------------------------------------------------


def test_an_admitted_request_holds_its_place_in_the_queue_until_its_inputs_join_it() -> None:
    async def main() -> None:
        async with started(RecordingBackend(), max_queued=10) as batcher:
            admission = batcher.admit(8)  # being tokenized: its inputs already count
            assert batcher.queue_depth() == 8
            with pytest.raises(Overloaded) as refused:
                batcher.admit(3)
            assert "limit 10" in refused.value.message and refused.value.headers()["Retry-After"] == "1"
            vectors = await batcher.embed([[1, 2]] * 8, admission)
            assert vectors.shape == (8, 16) and batcher.queue_depth() == 0
            with batcher.admit(10):  # a request refused after admission gives its place back
                pass
            assert batcher.queue_depth() == 0

    run(main())


def test_inputs_whose_caller_leaves_are_counted_once_wherever_it_was_when_it_left() -> None:
    """Cancelled while it held its admission (tokenizing), or after its inputs joined the queue: either
    way `cancelled` counts its inputs, once, and the place is given back."""

    async def main() -> None:
        metrics = Metrics()
        metrics.declare_model("fake")
        backend = GatedBackend()
        tokenizing = asyncio.Event()

        async def request(inputs: int, *, hold: bool) -> None:
            with batcher.admit(inputs) as admission:
                if hold:
                    tokenizing.set()
                    await asyncio.Event().wait()  # cancelled here, before its inputs join the queue
                await batcher.embed([[777]] * inputs, admission)

        async with started(backend, metrics=metrics) as batcher:
            running = asyncio.create_task(batcher.embed([[1]]))
            await forward_started(backend)
            early = asyncio.create_task(request(2, hold=True))
            await tokenizing.wait()
            queued = asyncio.create_task(request(3, hold=False))
            await handed_over()
            assert batcher.queue_depth() == 5
            for task in (early, queued):
                task.cancel()
            await asyncio.gather(early, queued, return_exceptions=True)
            backend.release.set()
            await running
            await batcher.embed([[8]])  # a pass after the prune
            assert batcher.queue_depth() == 0
        labels = {"model": "fake", "reason": "cancelled"}
        assert metrics.registry.get_sample_value("embedserve_rejected_inputs_total", labels) == 5
        assert all(777 not in row for row in backend.rows)

    run(main())


def test_a_request_whose_wait_would_pass_the_limit_is_refused_at_once_with_that_wait() -> None:
    async def main() -> None:
        backend = GatedBackend()
        # 100 tokens a second until passes measure it: 1,000 tokens queued are ~10 s of work.
        async with started(backend, max_queue_wait_s=2.0, tokens_per_s=100.0) as batcher:
            running = asyncio.create_task(batcher.embed([[1, 2]]))
            await forward_started(backend)
            waiting = asyncio.create_task(batcher.embed([[5] * 250] * 4))
            await handed_over()
            assert batcher.queued_tokens == 1000
            assert batcher.expected_wait_s() == pytest.approx(10.0)
            with pytest.raises(Overloaded) as refused:
                batcher.admit(1)
            assert refused.value.code == "server_overloaded"
            assert refused.value.headers()["Retry-After"] == "8"  # until the wait is back under 2 s
            assert "10 s of work" in refused.value.message
            backend.release.set()
            await asyncio.wait_for(asyncio.gather(running, waiting), GUARD_S)
            batcher.admit(1).release()  # the queue drained: admitted again

    run(main())


def test_throughput_is_measured_from_the_passes_that_ran() -> None:
    async def main() -> None:
        async with started(RecordingBackend(workers=2), tokens_per_s=1.0) as batcher:
            for _ in range(40):
                await batcher.embed([[7] * 30] * 4)
            rate = batcher.tokens_per_s
            assert rate is not None and rate > 1000, "the fake backend embeds millions of tokens a second"

    run(main())


class Meter:
    """What the passes running at once hold, by the memory model the batcher packs by, and its peak."""

    def __init__(self, model: MemoryModel) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.holding = 0.0
        self.peak = 0.0


class MeteredBackend(RecordingBackend):
    """Adds each pass to a meter (several backends may share one) while it runs, slowly enough that
    passes of several workers overlap."""

    def __init__(self, meter: Meter, workers: int = 1) -> None:
        super().__init__(workers=workers)
        self.meter = meter

    def forward(self, batch: TokenBatch) -> FloatMatrix:
        rows, length = batch.shape
        cost, meter = self.meter.model.peak(rows, length), self.meter
        with meter.lock:
            meter.holding += cost
            meter.peak = max(meter.peak, meter.holding)
        try:
            threading.Event().wait(0.002)
            return super().forward(batch)
        finally:
            with meter.lock:
                meter.holding -= cost


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_passes_running_at_once_never_hold_more_than_the_memory_budget(workers: int) -> None:
    async def main() -> None:
        meter = Meter(MemoryModel(per_token=1000.0, per_square=10.0))
        budget = MemoryBudget(meter.model.peak(3, 300), explicit=True)
        rng = random.Random(workers)
        requests = [random_sequences(rng, rng.randint(1, 5), max_len=300) for _ in range(40)]
        async with started(MeteredBackend(meter, workers), memory=meter.model, budget=budget) as batcher:
            results = await asyncio.wait_for(
                asyncio.gather(*(batcher.embed(r) for r in requests)), GUARD_S * 3
            )
        for sequences, vectors in zip(requests, results, strict=True):
            assert_own_vectors(sequences, vectors)
        assert 0 < meter.peak <= budget.capacity
        assert budget.in_use == 0

    run(main())


def test_two_models_share_one_budget() -> None:
    async def main() -> None:
        meter = Meter(MemoryModel(per_token=1000.0))
        budget = MemoryBudget(meter.model.peak(1, 100) * 1.5, explicit=True)  # one pass of 100 at a time
        async with (
            started(MeteredBackend(meter), memory=meter.model, budget=budget) as a,
            started(MeteredBackend(meter), memory=meter.model, budget=budget) as b,
        ):
            await asyncio.wait_for(
                asyncio.gather(*(batcher.embed([[3] * 100]) for batcher in (a, b) for _ in range(20))),
                GUARD_S,
            )
        assert 0 < meter.peak <= budget.capacity, "two passes ran at once on a budget for one"

    run(main())


# ---- work classes: online first, batch inputs in idle capacity ------------------------------------


class SteppedBackend(RecordingBackend):
    """Every forward pass announces its rows (`entered`), then waits for the test to let it finish
    (`step`): the test decides when the model is free, and sees what each pass held."""

    def __init__(self) -> None:
        super().__init__()
        self.entered: queue.Queue[list[list[int]]] = queue.Queue()
        self.steps = threading.Semaphore(0)

    def forward(self, batch: TokenBatch) -> FloatMatrix:
        rows = [
            [int(t) for t in ids[mask.astype(bool)]]
            for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)
        ]
        self.entered.put(rows)
        assert self.steps.acquire(timeout=GUARD_S), "the test never let the pass finish"
        return super().forward(batch)

    async def next_pass(self) -> list[list[int]]:
        """The rows of the next pass to reach the model (it then waits for `step`)."""
        return await asyncio.to_thread(self.entered.get, True, GUARD_S)

    def step(self) -> None:
        self.steps.release()


def test_with_both_classes_waiting_the_next_pass_is_the_online_inputs() -> None:
    async def main() -> None:
        backend = SteppedBackend()
        async with started(backend) as batcher:
            first = asyncio.ensure_future(batcher.embed([[1, 1]]))
            assert await backend.next_pass() == [[1, 1]]
            background = asyncio.ensure_future(batcher.embed([[7, 7], [8, 8]], work="batch"))
            await handed_over()  # the batch inputs are older than the online one
            online = asyncio.ensure_future(batcher.embed([[2, 2]]))
            await handed_over()
            backend.step()
            assert await backend.next_pass() == [[2, 2]], "the online input goes first, alone"
            backend.step()
            assert sorted(await backend.next_pass()) == [[7, 7], [8, 8]]
            backend.step()
            assert_own_vectors([[2, 2]], await online)
            assert_own_vectors([[7, 7], [8, 8]], await background)
            await first

    run(main())


def test_a_batch_input_waits_while_online_inputs_keep_arriving_then_runs_when_none_waits() -> None:
    async def main() -> None:
        backend = SteppedBackend()
        async with started(backend) as batcher:
            calls = [asyncio.ensure_future(batcher.embed([[1]]))]
            assert await backend.next_pass() == [[1]]
            background = asyncio.ensure_future(batcher.embed([[9, 9, 9]], work="batch"))
            for i in range(2, 6):  # each online caller arrives while the pass before it runs
                calls.append(asyncio.ensure_future(batcher.embed([[i]])))
                await handed_over()
                backend.step()
                assert await backend.next_pass() == [[i]]
                assert not background.done() and batcher.queue_depth("batch") == 1
            backend.step()  # no online input waits now
            assert await backend.next_pass() == [[9, 9, 9]]
            backend.step()
            assert_own_vectors([[9, 9, 9]], await background)
            for i, call in enumerate(calls, start=1):
                assert_own_vectors([[i]], await call)

    run(main())


def test_queued_batch_inputs_neither_refuse_online_requests_nor_raise_their_wait() -> None:
    async def main() -> None:
        backend = GatedBackend()
        # 100 tokens a second: the 4,000 batch tokens below would be 40 s of online wait (limit 2 s), and
        # their 40 inputs four times the online queue's 10.
        async with started(backend, max_queued=10, max_queue_wait_s=2.0, tokens_per_s=100.0) as batcher:
            running = asyncio.create_task(batcher.embed([[1, 2]]))
            await forward_started(backend)
            background = asyncio.create_task(batcher.embed([[5] * 100] * 40, work="batch"))
            held = batcher.admit(40, "batch")  # batch work being tokenized: not bounded either
            await handed_over()
            assert batcher.queue_depth("batch") == 80 and batcher.queue_depth() == 0
            assert batcher.queued_tokens == 0 and batcher.expected_wait_s() == 0.0
            with batcher.admit(10) as admission:  # the whole online queue is still free
                online = asyncio.create_task(batcher.embed([[3, 4]] * 10, admission))
                await handed_over()
            assert batcher.queued_tokens == 20 and batcher.expected_wait_s() == pytest.approx(0.2)
            with pytest.raises(Overloaded):  # online inputs still count against the online bound
                batcher.admit(1)
            held.release()
            backend.release.set()
            assert_own_vectors([[3, 4]] * 10, await asyncio.wait_for(online, GUARD_S))
            assert_own_vectors([[5] * 100] * 40, await asyncio.wait_for(background, GUARD_S))
            await running
        assert backend.rows.index([3, 4]) < backend.rows.index([5] * 100)

    run(main())


def test_batch_work_is_refused_once_the_batcher_is_closed() -> None:
    async def main() -> None:
        async with started(FakeBackend(seed=SEED)) as batcher:
            assert_own_vectors([[1, 2]], await batcher.embed([[1, 2]], work="batch"))
        with pytest.raises(ServiceUnavailable):
            batcher.admit(1, "batch")
        with pytest.raises(ServiceUnavailable):
            await batcher.embed([[1]], work="batch")

    run(main())


def test_close_fails_waiting_batch_inputs_with_service_unavailable() -> None:
    async def main() -> None:
        backend = GatedBackend()
        batcher = Batcher(
            "fake",
            backend,
            pad_id=0,
            padding_side="right",
            max_batch_items=64,
            limits=BatchLimits(max_tokens=4096, max_wait_ms=0.0, max_padding=MAX_PADDING),
        )
        batcher.start()
        running = asyncio.create_task(batcher.embed([[1, 2]]))
        await forward_started(backend)
        waiting = asyncio.create_task(batcher.embed([[3, 4]], work="batch"))
        await handed_over()
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0)
        backend.release.set()
        await asyncio.wait_for(closing, GUARD_S)
        done, _ = await asyncio.wait({waiting, running}, timeout=ANSWER_S)
        assert waiting in done and isinstance(waiting.exception(), ServiceUnavailable)
        assert batcher.queue_depth("batch") == 0
        assert all(3 not in row for row in backend.rows)

    run(main())


def test_a_cancelled_batch_callers_items_never_reach_the_backend() -> None:
    async def main() -> None:
        backend = GatedBackend()
        async with started(backend) as batcher:
            a = asyncio.create_task(batcher.embed([[1, 2, 3]]))
            await forward_started(backend)
            b = asyncio.create_task(batcher.embed([[777, 777], [777]], work="batch"))
            await handed_over()
            assert batcher.queue_depth("batch") == 2
            b.cancel()
            with pytest.raises(asyncio.CancelledError):
                await b
            backend.release.set()
            await a
            assert_own_vectors([[8, 9]], await batcher.embed([[8, 9]], work="batch"))
            assert batcher.queue_depth("batch") == 0
        assert all(777 not in row for row in backend.rows)

    run(main())


def test_with_fill_batch_inputs_share_an_online_pass_no_longer_than_its_own() -> None:
    async def main() -> None:
        backend = SteppedBackend()
        limits = BatchLimits(max_tokens=4096, max_wait_ms=0.0, max_padding=MAX_PADDING, fill=True)
        batcher = Batcher("fake", backend, pad_id=0, padding_side="right", limits=limits, max_batch_items=64)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.embed([[1]]))
            assert await backend.next_pass() == [[1]]
            background = asyncio.ensure_future(batcher.embed([[7] * 4, [8] * 4, [9] * 9], work="batch"))
            online = asyncio.ensure_future(batcher.embed([[2] * 4]))
            await handed_over()
            backend.step()
            assert sorted(await backend.next_pass()) == [[2] * 4, [7] * 4, [8] * 4]
            backend.step()
            assert await backend.next_pass() == [[9] * 9]  # it would have lengthened the online pass
            backend.step()
            assert_own_vectors([[2] * 4], await online)
            assert_own_vectors([[7] * 4, [8] * 4, [9] * 9], await background)
            await first
        finally:
            for _ in range(3):
                backend.step()
            await batcher.close()

    run(main())


@pytest.mark.parametrize(("recent_online_s", "rows"), [(GUARD_S * 10, [1, 1, 1, 1]), (0.0, [4])])
def test_passes_of_batch_inputs_alone_stay_small_while_online_work_is_recent(
    recent_online_s: float, rows: list[int]
) -> None:
    """After an online input, the batch inputs (4 of 10 tokens) go in passes of at most 16 slots while
    online work is recent (here: always), so an online input arriving meanwhile waits for little; with
    no recent online work (here: never), in passes of the full budget."""

    async def main() -> None:
        backend = RecordingBackend()
        limits = BatchLimits(
            max_tokens=4096, max_wait_ms=0.0, max_padding=MAX_PADDING, recent_batch_tokens=16
        )
        batcher = Batcher(
            "fake",
            backend,
            pad_id=0,
            padding_side="right",
            limits=limits,
            max_batch_items=64,
            recent_online_s=recent_online_s,
        )
        batcher.start()
        try:
            await batcher.embed([[1]])
            assert_own_vectors([[5] * 10] * 4, await batcher.embed([[5] * 10] * 4, work="batch"))
        finally:
            await batcher.close()
        assert [n for n, _ in backend.batches[1:]] == rows

    run(main())


def test_the_metrics_count_each_class_apart() -> None:
    """Online waits and depth are what the online bounds and alerts read: batch inputs go to their own
    series."""

    def sample(metrics: Metrics, name: str) -> float:
        value = metrics.registry.get_sample_value(name, {"model": "fake"})
        assert value is not None, name
        return value

    async def main() -> None:
        metrics = Metrics()
        metrics.declare_model("fake")
        backend = GatedBackend()
        async with started(backend, metrics=metrics) as batcher:
            metrics.track_queue("fake", batcher.queue_depth)
            running = asyncio.create_task(batcher.embed([[1]]))
            await forward_started(backend)
            background = asyncio.create_task(batcher.embed([[2]] * 3, work="batch"))
            online = asyncio.create_task(batcher.embed([[3]] * 2))
            await handed_over()
            assert sample(metrics, "embedserve_queue_depth_inputs") == 2
            assert sample(metrics, "embedserve_batch_queue_depth_inputs") == 3
            backend.release.set()
            await asyncio.gather(running, background, online)
        assert sample(metrics, "embedserve_queue_wait_seconds_count") == 3
        assert sample(metrics, "embedserve_batch_queue_wait_seconds_count") == 3
        assert sample(metrics, "embedserve_batch_size_inputs_sum") == 6

    run(main())


def test_under_load_an_online_batch_waits_for_online_inputs_on_their_way_not_for_a_batch_backlog() -> None:
    """As test_under_load_a_batch_waits_for_inputs_on_their_way, with batch inputs queued too: they
    cannot fill an online pass (no fill on this device), so the online pass still waits for C."""

    async def main() -> None:
        backend = GatedBackend()
        async with started(backend, max_batch_items=2, max_batch_wait_ms=GUARD_S * 1000) as batcher:
            a = asyncio.ensure_future(batcher.embed([[1]]))
            await forward_started(backend)
            background = asyncio.ensure_future(batcher.embed([[9]] * 4, work="batch"))  # 2 full passes
            b = asyncio.ensure_future(batcher.embed([[2]]))
            await handed_over()
            backend.release.set()
            await asyncio.wait_for(a, GUARD_S)
            c = await asyncio.wait_for(batcher.embed([[3]]), GUARD_S)
            await asyncio.wait_for(asyncio.gather(b, background), GUARD_S)
            assert_own_vectors([[3]], c)
        assert backend.rows[:3] == [[1], [2], [3]]
        assert [rows for rows, _ in backend.batches][:2] == [1, 2]

    run(main())
