"""Per-model dynamic batcher: every input of every request is one WorkItem; the model's own threads (one
per backend worker: `Backend.workers` passes may run at once) each pack waiting items
(scheduler.packing), run the batch and start the next one at once, without a round trip through the
event loop (which, busy with HTTP, left the model idle ~3 ms between batches: 20% of the online load's
time). The event loop only queues inputs and receives vectors.

Inputs queued during one turn of the event loop are handed to the model threads together at its end, so
the inputs of requests that arrive together share a forward pass. There is no added wait when the queue
is idle. Under load (a batch has just finished and inputs are waiting), a model thread waits at most
`max_batch_wait_ms` for the batch to fill: the callers whose answers just went out are typically sending
their next input, and on a GPU one full batch beats a small one followed by another (on CPU the default
is no wait: scheduler.packing.batch_limits). Admission is bounded (`max_queued`): a request that would
overfill the queue is refused at once with 503."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from embedserve.backends.base import Backend
from embedserve.errors import InternalError, Overloaded, ServiceUnavailable
from embedserve.metrics import Metrics
from embedserve.scheduler.packing import BatchLimits, collate, take_batch
from embedserve.types import FloatMatrix, PaddingSide, WorkItem

log = logging.getLogger("embedserve.batcher")


class Batcher:
    def __init__(self, name: str, backend: Backend, *, pad_id: int, padding_side: PaddingSide,
                 limits: BatchLimits, max_batch_items: int, max_queued: int | None = None,
                 metrics: Metrics | None = None) -> None:
        """`limits`: the device's packing rules (scheduler.packing.batch_limits)."""
        self.name = name
        self._backend = backend
        self._pad_id = pad_id
        self._padding_side: PaddingSide = padding_side
        self._limits = limits
        self._max_batch_items = max_batch_items
        self._max_wait_s = limits.max_wait_ms / 1000
        self._max_queued = max_queued
        self._metrics = metrics
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        # Event-loop side: inputs queued in this turn of the loop, handed over at its end.
        self._arrivals: list[WorkItem] = []
        # Shared with the model threads, under `_cond`.
        self._cond = threading.Condition()
        self._pending: list[WorkItem] = []
        self._closed = False

    @property
    def queued(self) -> int:
        return len(self._arrivals) + len(self._pending)

    def queue_depth(self) -> int:
        """Inputs waiting (for the metrics gauge, read at scrape time)."""
        return self.queued

    def start(self) -> None:
        if not self._threads:
            loop = asyncio.get_running_loop()
            self._threads = [threading.Thread(target=self._work, args=(loop,), daemon=True,
                                              name=f"embedserve-{self.name}-{i}")
                             for i in range(self._backend.workers)]
            for thread in self._threads:
                thread.start()

    async def embed(self, sequences: Sequence[list[int]]) -> FloatMatrix:
        """Embed id sequences; returns [N, D] in the order given. If the caller is cancelled (client
        gone), its items that have not reached the model are dropped."""
        if self._closed:
            raise ServiceUnavailable(f"model '{self.name}' is shutting down")
        queued = self.queued
        if self._max_queued is not None and queued + len(sequences) > self._max_queued:
            if self._metrics is not None:
                self._metrics.observe_rejected(self.name, "queue_full", len(sequences))
            raise Overloaded(f"The model '{self.name}' has {queued} inputs queued (limit "
                             f"{self._max_queued}); retry shortly.", retry_after_s=1)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        seqs = [next(self._seq) for _ in sequences]
        items = [WorkItem(ids=ids, seq=seq, future=loop.create_future(), queued_at=now, request=seqs[0])
                 for ids, seq in zip(sequences, seqs, strict=True)]
        if not self._arrivals:
            loop.call_soon(self._hand_over)
        self._arrivals.extend(items)
        try:
            vectors = await asyncio.gather(*(item.future for item in items))
        except BaseException:
            for item in items:
                item.future.cancel()
            raise
        return np.stack(vectors)

    def _hand_over(self) -> None:
        """(Event loop, once per turn with arrivals.) Give this turn's inputs to the model thread. (After
        close() there are none: it took them, and embed() refuses new ones.)"""
        arrivals, self._arrivals = self._arrivals, []
        with self._cond:
            self._pending.extend(arrivals)
            self._cond.notify()

    # ---- the model thread ------------------------------------------------------------------------

    def _prune(self) -> bool:
        """(Under `_cond`.) Drop items whose caller has gone (client disconnected, deadline passed);
        True if anything is still waiting."""
        kept = [item for item in self._pending if not item.future.cancelled()]
        if len(kept) != len(self._pending) and self._metrics is not None:
            self._metrics.observe_rejected(self.name, "cancelled", len(self._pending) - len(kept))
        self._pending = kept
        return bool(self._pending)

    def _would_fill(self) -> bool:
        """Enough waiting for a full batch (padding ignored: a cheap, optimistic test)."""
        return (len(self._pending) >= self._max_batch_items
                or sum(item.length for item in self._pending) >= self._limits.max_tokens)

    def _next_batch(self, under_load: bool) -> list[WorkItem] | None:
        """(Under `_cond`.) Wait for inputs, then, under load, for the batch to fill; None once
        closed."""
        while not self._closed:
            if not self._prune():
                under_load = False
                self._cond.wait()
                continue
            if under_load and self._max_wait_s > 0:
                deadline = time.monotonic() + self._max_wait_s
                while not self._closed and not self._would_fill() \
                        and (remaining := deadline - time.monotonic()) > 0:
                    self._cond.wait(remaining)
                under_load = False  # waited once; whatever is there now goes
                continue
            limits = self._limits
            batch, self._pending = take_batch(self._pending, limits.max_tokens, self._max_batch_items,
                                              limits.max_padding, protect_last=limits.protect_last)
            if self._pending:  # more than this batch was waiting: an idle worker can take it
                self._cond.notify()
            return batch
        return None

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        under_load = False
        while True:
            with self._cond:
                batch = self._next_batch(under_load)
            if batch is None:
                return
            vectors: FloatMatrix | None = None
            try:
                tokens = collate([item.ids for item in batch], self._pad_id, self._padding_side)
                started = time.perf_counter()
                vectors = self._backend.forward(tokens)
            except Exception:  # this batch's callers get a 500; the thread goes on serving
                log.exception("forward pass failed for model '%s' (%d inputs)", self.name, len(batch))
            if self._metrics is not None and vectors is not None:
                rows, length = tokens.shape
                self._metrics.observe_batch(self.name, waits=[started - item.queued_at for item in batch],
                                            seconds=time.perf_counter() - started,
                                            real_tokens=tokens.real_tokens, slots=rows * length)
            # Under load: inputs arrived while this batch ran, so more are likely on their way (its
            # callers are about to send their next). Decided before the answers go out, so that a lone
            # caller's next input, which can only follow its answer, is never made to wait.
            with self._cond:
                under_load = bool(self._pending)
            try:
                loop.call_soon_threadsafe(self._deliver, batch, vectors)
            except RuntimeError:  # the event loop is gone: nobody is waiting any more
                return

    # ---- back on the event loop ------------------------------------------------------------------

    @staticmethod
    def _deliver(batch: list[WorkItem], vectors: FloatMatrix | None) -> None:
        for i, item in enumerate(batch):
            if item.future.done():
                continue
            if vectors is None:
                item.future.set_exception(InternalError("inference failed"))
            else:
                item.future.set_result(vectors[i])

    async def close(self) -> None:
        """Stop packing; fail whatever still waits; wait for the batch in the model's hands (its
        callers get its vectors); release the model thread."""
        with self._cond:
            self._closed = True
            waiting = [*self._arrivals, *self._pending]
            self._arrivals, self._pending = [], []
            self._cond.notify_all()
        for item in waiting:
            if not item.future.done():
                item.future.set_exception(ServiceUnavailable(f"model '{self.name}' shut down"))
        for thread in self._threads:  # its last delivery is scheduled before the join returns
            await asyncio.to_thread(thread.join)
