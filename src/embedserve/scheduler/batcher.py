"""Per-model dynamic batcher: every input of every request is one WorkItem; a single loop packs waiting
items (scheduler.packing) and runs each batch on the model's own executor thread. There is no added wait
when the queue is idle. Under load (a batch has just finished and inputs are waiting), the loop waits at
most `max_batch_wait_ms` for the batch to fill: the callers whose answers just went out are typically
sending their next input, and one full batch beats a small one followed by another. Admission is
bounded (`max_queued`): a request that would overfill the queue is refused at once with 503."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from embedserve.backends.base import Backend
from embedserve.errors import InternalError, Overloaded, ServiceUnavailable
from embedserve.metrics import Metrics
from embedserve.scheduler.packing import MAX_PADDING, collate, take_batch
from embedserve.types import FloatMatrix, PaddingSide, WorkItem

log = logging.getLogger("embedserve.batcher")


class Batcher:
    def __init__(self, name: str, backend: Backend, *, pad_id: int, padding_side: PaddingSide,
                 max_batch_tokens: int, max_batch_items: int, max_batch_wait_ms: float = 0.0,
                 max_padding: float = MAX_PADDING, max_queued: int | None = None,
                 metrics: Metrics | None = None) -> None:
        self.name = name
        self._backend = backend
        self._pad_id = pad_id
        self._padding_side: PaddingSide = padding_side
        self._max_batch_tokens = max_batch_tokens
        self._max_batch_items = max_batch_items
        self._max_wait_s = max_batch_wait_ms / 1000
        self._max_padding = max_padding
        self._max_queued = max_queued
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embedserve-{name}")
        self._pending: list[WorkItem] = []
        self._running: list[WorkItem] = []  # the batch on the executor right now
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        return len(self._pending)

    def queue_depth(self) -> int:
        """Inputs waiting (for the metrics gauge, read at scrape time)."""
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name=f"batcher-{self.name}")

    async def embed(self, sequences: Sequence[list[int]]) -> FloatMatrix:
        """Embed id sequences; returns [N, D] in the order given. If the caller is cancelled (client
        gone), its items that have not reached the model are dropped."""
        if self._closed:
            raise ServiceUnavailable(f"model '{self.name}' is shutting down")
        if self._max_queued is not None and len(self._pending) + len(sequences) > self._max_queued:
            if self._metrics is not None:
                self._metrics.observe_rejected(self.name, "queue_full", len(sequences))
            raise Overloaded(f"The model '{self.name}' has {len(self._pending)} inputs queued (limit "
                             f"{self._max_queued}); retry shortly.", retry_after_s=1)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [WorkItem(ids=ids, seq=next(self._seq), future=loop.create_future(), queued_at=now)
                 for ids in sequences]
        self._pending.extend(items)
        self._wakeup.set()
        try:
            vectors = await asyncio.gather(*(item.future for item in items))
        except BaseException:
            for item in items:
                item.future.cancel()
            raise
        return np.stack(vectors)

    def _prune(self) -> bool:
        """Drop items whose caller has gone (client disconnected, deadline passed); True if anything is
        still waiting."""
        kept = [item for item in self._pending if not item.future.cancelled()]
        if len(kept) != len(self._pending) and self._metrics is not None:
            self._metrics.observe_rejected(self.name, "cancelled", len(self._pending) - len(kept))
        self._pending = kept
        return bool(self._pending)

    def _would_fill(self) -> bool:
        """Enough waiting for a full batch (padding ignored: a cheap, optimistic test)."""
        return (len(self._pending) >= self._max_batch_items
                or sum(item.length for item in self._pending) >= self._max_batch_tokens)

    async def _fill(self) -> None:
        """Wait until a full batch is waiting or `max_batch_wait_ms` has passed."""
        deadline = asyncio.get_running_loop().time() + self._max_wait_s
        while True:
            self._wakeup.clear()  # before the check, so that no arrival goes unnoticed
            remaining = deadline - asyncio.get_running_loop().time()
            if self._would_fill() or remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        under_load = False  # a batch has just run: more inputs are likely on their way
        while True:
            if not self._prune():
                under_load = False
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if under_load and self._max_wait_s > 0:
                await self._fill()
                if not self._prune():
                    continue
            under_load = True
            batch, self._pending = take_batch(self._pending, self._max_batch_tokens,
                                              self._max_batch_items, self._max_padding)
            tokens = collate([item.ids for item in batch], self._pad_id, self._padding_side)
            self._running = batch
            started = time.perf_counter()
            try:
                vectors = await loop.run_in_executor(self._executor, self._backend.forward, tokens)
            except Exception:
                log.exception("forward pass failed for model '%s' (batch %s)", self.name,
                              tokens.shape)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(InternalError("inference failed"))
                continue
            finally:
                self._running = []
            if self._metrics is not None:
                rows, length = tokens.shape
                self._metrics.observe_batch(self.name, waits=[started - item.queued_at for item in batch],
                                            seconds=time.perf_counter() - started,
                                            real_tokens=tokens.real_tokens, slots=rows * length)
            for item, vector in zip(batch, vectors, strict=True):
                if not item.future.done():
                    item.future.set_result(vector)

    async def close(self) -> None:
        """Stop packing; fail whatever still waits; release the executor thread."""
        self._closed = True
        waiting = [*self._pending, *self._running]  # the loop's `finally` forgets the running batch
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in (*waiting, *self._pending):
            if not item.future.done():
                item.future.set_exception(ServiceUnavailable(f"model '{self.name}' shut down"))
        self._pending.clear()
        self._executor.shutdown(wait=True)
