"""Per-model dynamic batcher: every input of every request is one WorkItem with its future; the model's own
threads pack waiting inputs (scheduler.packing; online inputs first, batch inputs in idle capacity), run
each batch and deliver its vectors to the event loop; online admission is bounded before any work (design
notes 27, 31, 32, 51)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from embedserve.backends.base import Backend
from embedserve.backends.batch import collate, split_rows
from embedserve.backends.memory import trim
from embedserve.errors import InternalError, Overloaded, ServiceUnavailable
from embedserve.metrics import Metrics
from embedserve.scheduler.memory import MemoryBudget, MemoryModel
from embedserve.scheduler.packing import BatchLimits, MemoryRoom, Waiting, first_up, take_batch
from embedserve.types import FloatMatrix, PaddingSide, RowOutputs, WorkClass, WorkItem

log = logging.getLogger("embedserve.batcher")

#: After a pass estimated above this, the heap's free pages go back to the system, so that one long
#: input does not leave the process gigabytes larger for good.
TRIM_ABOVE_BYTES = 256 << 20
#: How much each pass moves the throughput estimate (weighted by its duration).
RATE_DECAY = 0.9
#: For this long after an online input arrived or went to the model, passes of batch-class inputs
#: alone are held to `BatchLimits.recent_batch_tokens`: an online input that arrives meanwhile waits
#: for the pass in flight (design note 51).
RECENT_ONLINE_S = 1.0


@dataclass(slots=True)
class Tally:
    """One work class's inputs admitted and not yet in a forward pass: being tokenized (`reserved`),
    queued in this turn of the event loop (`arriving`), and with the model threads (`pending`, changed
    under the batcher's condition, read without it: one int each)."""

    reserved: int = 0
    arriving: int = 0
    arriving_tokens: int = 0
    pending: int = 0
    pending_tokens: int = 0

    @property
    def inputs(self) -> int:
        return self.reserved + self.arriving + self.pending

    @property
    def tokens(self) -> int:
        """Tokens known to be queued (those being tokenized are not known yet)."""
        return self.arriving_tokens + self.pending_tokens


class Admission:
    """A request's place in the queue from admission until its inputs join it (or it fails): its
    inputs count against its class's queue meanwhile. Released once. `dropped(inputs)`: told when the
    caller is cancelled (client gone, deadline) while it still holds the place (e.g. tokenizing)."""

    def __init__(
        self, tally: Tally, inputs: int, work: WorkClass, dropped: Callable[[int], None] | None = None
    ) -> None:
        self._tally = tally
        self.inputs = inputs
        self.work: WorkClass = work
        self._dropped = dropped
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._tally.reserved -= self.inputs

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._held and kind is not None and issubclass(kind, asyncio.CancelledError) and self._dropped:
            self._dropped(self.inputs)
        self.release()


class Batcher:
    """The model's threads (one per backend worker: `Backend.workers` passes may run at once) each pack
    waiting inputs (packing sees their lengths and callers, not the items), run the batch and start the next
    one at once, without a round trip through the event loop (which, busy with HTTP, left the model idle ~3 ms
    between batches: 20% of the online load's time). The event loop only queues inputs and receives vectors.

    Inputs queued during one turn of the event loop are handed to the model threads together at its end, so
    the inputs of requests that arrive together share a forward pass. There is no added wait when the queue is
    idle. Under load (a batch has just finished and inputs are waiting), a model thread waits at most
    `max_batch_wait_ms` for the batch to fill: the callers whose answers just went out are typically sending
    their next input, and on a GPU one full batch beats a small one followed by another (on CPU the default is
    no wait: scheduler.packing.batch_limits).

    Admission comes before any work (`admit`, called before tokenization): a request that would overfill the
    queue (`max_queued` inputs), or whose expected wait (the tokens queued ahead of it over the model's
    measured throughput) is beyond `max_queue_wait_s`, is refused at once with 503; an admitted request's
    inputs count against the queue's bound while it is tokenized, and its wait is checked again once its
    tokens are known and join the queue. A batch also fits the memory budget that the passes running at once
    share (scheduler.memory): an input waits for room, and nothing younger overtakes it meanwhile (design
    notes 31, 32).

    Inputs are of two work classes. While an online input waits, the next batch is packed from online
    inputs (on a GPU, batch-class inputs may take the room it leaves); batch-class inputs form a pass
    when none waits, so a batch job runs in the model's idle time and is only ever delayed by online
    work. The online bounds above count only online inputs: a batch job's backlog never makes an online
    request wait or be refused. Batch-class work is admitted without them (its submitter bounds what it
    keeps queued), refused only once the batcher is closed (design note 51).
    """

    def __init__(
        self,
        name: str,
        backend: Backend,
        *,
        pad_id: int,
        padding_side: PaddingSide,
        limits: BatchLimits,
        max_batch_items: int,
        max_queued: int | None = None,
        metrics: Metrics | None = None,
        max_queue_wait_s: float | None = None,
        tokens_per_s: float | None = None,
        memory: MemoryModel | None = None,
        budget: MemoryBudget | None = None,
        recent_online_s: float = RECENT_ONLINE_S,
    ) -> None:
        """`limits`: the device's packing rules (scheduler.packing.batch_limits). `tokens_per_s`: the
        model's throughput measured at load, until passes measure it. `memory`, `budget`: a pass's
        estimated peak and the memory the passes running at once may hold. `recent_online_s`: how long
        after online work passes of batch inputs alone stay within `limits.recent_batch_tokens`."""
        self.name = name
        self._backend = backend
        self._pad_id = pad_id
        self._padding_side: PaddingSide = padding_side
        self._limits = limits
        self._max_batch_items = max_batch_items
        self._max_wait_s = limits.max_wait_ms / 1000
        self._max_queued = max_queued
        self._max_queue_wait_s = max_queue_wait_s
        self._metrics = metrics
        self._memory = memory or MemoryModel()
        self._budget = budget
        self._cond = threading.Condition()
        if budget is not None:  # a pass of another model that gives memory back wakes our threads
            budget.watch(self._cond)
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        # Event-loop side: inputs queued in this turn of the loop, handed over at its end.
        self._arrivals: list[WorkItem] = []
        # Shared with the model threads, under `_cond`: what packing sees of each waiting input, and
        # the items themselves by `seq`; the counts of each class at each stage.
        self._pending: list[Waiting] = []
        self._items: dict[int, WorkItem] = {}
        self._tally: dict[WorkClass, Tally] = {"online": Tally(), "batch": Tally()}
        self._online_at = -math.inf  # time.monotonic() an online input last arrived or went to the model
        self._recent_s = recent_online_s
        self._closed = False
        # Throughput: tokens and seconds of recent passes, each decayed by RATE_DECAY per pass.
        self._rate_tokens = float(tokens_per_s or 0.0)
        self._rate_seconds = 1.0 if tokens_per_s else 0.0

    @property
    def queued_tokens(self) -> int:
        """Online tokens waiting for the model (what an online request's wait is estimated from)."""
        return self._tally["online"].tokens

    @property
    def tokens_per_s(self) -> float | None:
        """Measured throughput, all workers together; None before anything measured it."""
        if self._rate_seconds <= 0:
            return None
        return self._rate_tokens / self._rate_seconds * self._backend.workers

    def expected_wait_s(self) -> float:
        """How long an online request admitted now would wait for the online tokens ahead of it."""
        rate = self.tokens_per_s
        return 0.0 if not rate else self.queued_tokens / rate

    @property
    def memory(self) -> MemoryModel:
        return self._memory

    def longest_that_fits(self) -> int | None:
        """The longest input whose pass fits the whole memory budget (None: no budget)."""
        if self._budget is None or math.isinf(self._budget.capacity):
            return None
        return self._memory.longest_that_fits(self._budget.capacity)

    def admit(self, inputs: int, work: WorkClass = "online") -> Admission:
        """Before any work on a request of `inputs` inputs: its place in the queue, or Overloaded at
        once (online: the online queue is full, or the online wait ahead of it too long; a batch job's
        inputs are refused only once the batcher is closed)."""
        if self._closed:
            raise ServiceUnavailable(f"model '{self.name}' is shutting down")
        tally = self._tally[work]
        if work == "batch":
            tally.reserved += inputs
            return Admission(tally, inputs, work, self._cancelled)
        queued = tally.inputs
        if self._max_queued is not None and queued + inputs > self._max_queued:
            if self._metrics is not None:
                self._metrics.observe_rejected(self.name, "queue_full", inputs)
            raise Overloaded(
                f"The model '{self.name}' has {queued} inputs queued (limit "
                f"{self._max_queued}); retry shortly.",
                retry_after_s=1,
            )
        self._check_wait(inputs)
        tally.reserved += inputs
        return Admission(tally, inputs, work, self._cancelled)

    def _cancelled(self, inputs: int) -> None:
        """Inputs whose caller left (or whose deadline passed) before they reached the model."""
        if self._metrics is not None:
            self._metrics.observe_rejected(self.name, "cancelled", inputs)

    def _check_wait(self, inputs: int) -> None:
        wait = self.expected_wait_s()
        if self._max_queue_wait_s is not None and wait > self._max_queue_wait_s:
            if self._metrics is not None:
                self._metrics.observe_rejected(self.name, "queue_wait", inputs)
            retry = max(1, math.ceil(wait - self._max_queue_wait_s))
            raise Overloaded(
                f"The model '{self.name}' has about {wait:.0f} s of work queued ahead (limit "
                f"{self._max_queue_wait_s:g} s); retry in {retry} s.",
                retry_after_s=retry,
            )

    def queue_depth(self, work: WorkClass = "online") -> int:
        """Inputs of class `work` admitted and not yet in a forward pass (also the metrics gauges, read
        at scrape time)."""
        return self._tally[work].inputs

    def start(self) -> None:
        if not self._threads:
            loop = asyncio.get_running_loop()
            self._threads = [
                threading.Thread(
                    target=self._work, args=(loop,), daemon=True, name=f"embedserve-{self.name}-{i}"
                )
                for i in range(self._backend.workers)
            ]
            for thread in self._threads:
                thread.start()

    async def embed(
        self,
        sequences: Sequence[list[int]],
        admission: Admission | None = None,
        *,
        work: WorkClass = "online",
    ) -> FloatMatrix:
        """`encode`'s pooled vectors alone: [N, D] in the order given."""
        rows = await self.encode(sequences, admission, work=work)
        return np.stack([row.dense for row in rows])

    async def encode(
        self,
        sequences: Sequence[list[int]],
        admission: Admission | None = None,
        *,
        work: WorkClass = "online",
        tokens: bool = False,
    ) -> list[RowOutputs]:
        """Embed id sequences of class `work`; returns each one's outputs in the order given (`tokens`:
        the per-token outputs too, where the model has them). `admission`: the request's place, taken
        by `admit` (for the same class) before its tokenization (without one, it is admitted here). If
        the caller is cancelled (client gone), its items that have not reached the model are dropped."""
        if admission is None:
            admission = self.admit(len(sequences), work)
        assert admission.work == work, f"a {admission.work} admission for {work} inputs"
        admission.release()  # its inputs take their place now
        if self._closed:
            raise ServiceUnavailable(f"model '{self.name}' is shutting down")
        if work == "online":  # requests tokenized side by side may have queued meanwhile
            self._check_wait(len(sequences))
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        seqs = [next(self._seq) for _ in sequences]
        items = [
            WorkItem(
                ids=ids,
                seq=seq,
                future=loop.create_future(),
                queued_at=now,
                request=seqs[0],
                work=work,
                tokens=tokens,
            )
            for ids, seq in zip(sequences, seqs, strict=True)
        ]
        if not self._arrivals:
            loop.call_soon(self._hand_over)
        self._arrivals.extend(items)
        tally = self._tally[work]
        tally.arriving += len(items)
        tally.arriving_tokens += sum(len(ids) for ids in sequences)
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except BaseException:
            for item in items:
                item.future.cancel()
            raise

    def _hand_over(self) -> None:
        """(Event loop, once per turn with arrivals.) Give this turn's inputs to the model thread. (After
        close() there are none: it took them, and embed() refuses new ones.)"""
        arrivals, self._arrivals = self._arrivals, []
        waiting = [Waiting(item.seq, item.length, item.caller, item.work) for item in arrivals]
        with self._cond:
            self._items.update((item.seq, item) for item in arrivals)
            self._pending.extend(waiting)
            if self._tally["online"].arriving:
                self._online_at = time.monotonic()
            for tally in self._tally.values():
                tally.pending += tally.arriving
                tally.pending_tokens += tally.arriving_tokens
                tally.arriving = tally.arriving_tokens = 0
            self._cond.notify()

    # ---- the model thread ------------------------------------------------------------------------

    def _prune(self) -> bool:
        """(Under `_cond`.) Drop items whose caller has gone (client disconnected, deadline passed);
        True if anything is still waiting."""
        gone = [seq for seq, item in self._items.items() if item.future.cancelled()]
        if gone:
            for seq in gone:
                item = self._items.pop(seq)
                tally = self._tally[item.work]
                tally.pending -= 1
                tally.pending_tokens -= item.length
            self._pending = [waiting for waiting in self._pending if waiting.seq in self._items]
            self._cancelled(len(gone))
        return bool(self._pending)

    def _would_fill(self) -> bool:
        """Enough waiting for a full batch (padding ignored: a cheap, optimistic test) of the inputs the
        next pass may take: online ones while any waits (batch ones too where they fill its room)."""
        online = self._tally["online"]
        if online.pending and not self._limits.fill:
            inputs, tokens = online.pending, online.pending_tokens
        else:
            inputs, tokens = len(self._pending), sum(t.pending_tokens for t in self._tally.values())
        return inputs >= self._max_batch_items or tokens >= self._limits.max_tokens

    def _next_batch(self, under_load: bool) -> tuple[list[WorkItem], float] | None:
        """(Under `_cond`.) Wait for inputs, then, under load, for the batch to fill, and for memory
        room for its pass: -> (batch, the memory reserved for it); None once closed."""
        while not self._closed:
            if not self._prune():
                under_load = False
                self._cond.wait()
                continue
            if under_load and self._max_wait_s > 0:
                deadline = time.monotonic() + self._max_wait_s
                while (
                    not self._closed
                    and not self._would_fill()
                    and (remaining := deadline - time.monotonic()) > 0
                ):
                    self._cond.wait(remaining)
                under_load = False  # waited once; whatever is there now goes
                continue
            limits = self._limits
            room = None if self._budget is None else self._room()
            now = time.monotonic()
            recent = now - self._online_at < self._recent_s
            batch, rest = take_batch(
                self._pending,
                limits.max_tokens,
                self._max_batch_items,
                limits.max_padding,
                protect_last=limits.protect_last,
                memory=room,
                fill=limits.fill,
                batch_tokens=limits.recent_batch_tokens if recent else None,
            )
            cost = self._memory.peak(len(batch), max((waiting.length for waiting in batch), default=0))
            if not batch or (self._budget is not None and not self._budget.try_reserve(cost)):
                self._cond.wait()  # a pass in flight holds the memory: woken when it gives it back
                continue
            self._pending = rest
            for waiting in batch:
                tally = self._tally[waiting.work]
                tally.pending -= 1
                tally.pending_tokens -= waiting.length
            if batch[0].work == "online":
                self._online_at = now
            if self._pending:  # more than this batch was waiting: an idle worker can take it
                self._cond.notify()
            return [self._items.pop(waiting.seq) for waiting in batch], cost
        return None

    def _room(self) -> MemoryRoom:
        """(Under `_cond`, with a budget.) The memory the next pass may hold. When no pass holds any,
        the oldest input of the class packed next always fits: it passed admission under a budget that
        may have shrunk since (a default budget follows the memory left as models load), and nothing
        would ever free more."""
        assert self._budget is not None
        room = self._budget.room()
        if self._budget.in_use <= 0:
            oldest = min(first_up(self._pending), key=lambda item: item.seq)
            room = max(room, self._memory.peak(1, oldest.length))
        return MemoryRoom(self._memory, room)

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        under_load = False
        while True:
            with self._cond:
                taken = self._next_batch(under_load)
            if taken is None:
                return
            batch, cost = taken
            vectors: list[RowOutputs] | None = None
            started = seconds = 0.0
            try:
                tokens = collate([item.ids for item in batch], self._pad_id, self._padding_side)
                started = time.perf_counter()
                outputs = self._backend.encode(tokens, tokens=any(item.tokens for item in batch))
                seconds = time.perf_counter() - started
                vectors = split_rows(outputs, tokens.attention_mask)
                del outputs  # the pass's [B, T, C] ColBERT vectors go now, not at the next pass
            except Exception:  # this batch's callers get a 500; the thread goes on serving
                log.exception("forward pass failed for model '%s' (%d inputs)", self.name, len(batch))
            finally:
                if self._budget is not None:
                    self._budget.release(cost)
                if cost > TRIM_ABOVE_BYTES:
                    trim()
            if vectors is not None:
                self._measured(tokens.real_tokens, seconds)
            if self._metrics is not None and vectors is not None:
                rows, length = tokens.shape
                self._metrics.observe_batch(
                    self.name,
                    waits=[started - item.queued_at for item in batch if item.work == "online"],
                    batch_waits=[started - item.queued_at for item in batch if item.work == "batch"],
                    seconds=seconds,
                    real_tokens=tokens.real_tokens,
                    slots=rows * length,
                )
            # Under load: inputs arrived while this batch ran, so more are likely on their way (its
            # callers are about to send their next). Decided before the answers go out, so that a lone
            # caller's next input, which can only follow its answer, is never made to wait.
            with self._cond:
                under_load = bool(self._pending)
            try:
                loop.call_soon_threadsafe(self._deliver, batch, vectors)
            except RuntimeError:  # the event loop is gone: nobody is waiting any more
                return

    def _measured(self, tokens: int, seconds: float) -> None:
        """(A model thread.) Fold one pass into the throughput estimate, weighted by its duration."""
        with self._cond:
            self._rate_tokens = self._rate_tokens * RATE_DECAY + tokens
            self._rate_seconds = self._rate_seconds * RATE_DECAY + seconds

    # ---- back on the event loop ------------------------------------------------------------------

    @staticmethod
    def _deliver(batch: list[WorkItem], vectors: list[RowOutputs] | None) -> None:
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
            waiting = [*self._arrivals, *self._items.values()]
            self._arrivals, self._pending, self._items = [], [], {}
            for tally in self._tally.values():
                tally.arriving = tally.arriving_tokens = tally.pending = tally.pending_tokens = 0
            self._cond.notify_all()
        for item in waiting:
            if not item.future.done():
                item.future.set_exception(ServiceUnavailable(f"model '{self.name}' shut down"))
        for thread in self._threads:  # its last delivery is scheduled before the join returns
            await asyncio.to_thread(thread.join)
