"""Pure batch packing over plain values (`Waiting`: arrival order, length, caller, work class; never the
batcher's items): which waiting inputs form the next forward pass under the work classes' order and the
token, item, padding and memory limits (design notes 28, 30, 32, 51)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from embedserve.scheduler.memory import MemoryModel
from embedserve.types import WorkClass

#: Padding slots allowed per real token in a batch (0.25: at most 20% of a batch is padding). On a GPU a
#: forward pass costs about the same for a wide batch as for a narrow one, so filling it matters more
#: than a little padding.
MAX_PADDING = 0.25
#: On CPU every padded slot costs as much as a real token and a forward call costs little (about 2 ms
#: for all-MiniLM-L6-v2, the time of ~4 tokens on 2 threads, ~8 on one), so batches stay within 5%
#: padding: replaying the bulk benchmark load through `take_batch` computes 1.23x the real tokens at
#: 0.25 and 1.04x at 0.05 (in-process sorted batches of 32: 1.04x).
CPU_MAX_PADDING = 0.05
#: Token slots per forward pass on a GPU, and how long a batch may wait to fill under load: a wide batch
#: costs about what a narrow one does there.
GPU_BATCH_TOKENS = 16_384
GPU_BATCH_WAIT_MS = 2.0
#: Token slots per forward pass on CPU, per thread of the pass. On CPU a pass costs its rows times its
#: length plus ~2 ms (all-MiniLM-L6-v2, one thread: the time of ~8 tokens), so merging beyond ~256
#: slots saves under 5%, while every input in a batch waits for the whole batch and the younger ones
#: overtake older inputs left out of it. Measured on the online load (16 callers of one input, 2 workers
#: of 1 thread, 3 paired runs): p99 222 ms at 256 slots against 255 ms at 16384, inputs/s and the bulk
#: load unchanged (design note 28).
CPU_BATCH_TOKENS_PER_THREAD = 256
#: On CPU the next batch never waits to fill: a waiting worker leaves its core idle, and filling matters
#: little (above). Paired runs, 2 workers: online 140/s at 0 ms against 131/s at 2 ms, bulk +5%.
CPU_BATCH_WAIT_MS = 0.0
#: While online work is recent, a pass of batch inputs alone takes at most this share of a pass's token
#: slots: an online input that arrives meanwhile waits for the pass in flight. On CPU (64 of 256 slots),
#: with 2 online callers beside a batch stream, online p50 went from 16 to 13 ms and p99 from 58 to 45 ms
#: (alone: 8 and 40 ms) for 12% less batch throughput meanwhile (design note 51). The same share on a GPU
#: is a guess: nothing here measured one.
RECENT_BATCH_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class Waiting:
    """What packing knows of a waiting input: `seq` orders arrival (oldest first, unique), `length` is
    its tokens, `caller` which request it belongs to (inputs with the same caller share one answer),
    `work` whether a client waits for it ("online") or a batch job ("batch": only idle capacity)."""

    seq: int
    length: int
    caller: int
    work: WorkClass = "online"


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_tokens: int  # token slots per forward pass, padding included
    max_wait_ms: float  # under load, how long the next batch may wait to fill
    max_padding: float  # padding slots allowed per real token
    #: A request's last waiting input is never overtaken (CPU: every input added lengthens the pass).
    protect_last: bool = False
    #: Batch-class inputs may take the room an online pass leaves (GPU: a wider pass costs little more;
    #: on CPU it costs the online inputs its rows: design note 51).
    fill: bool = False
    #: Token slots of a pass of batch-class inputs alone while online traffic is recent (None:
    #: `max_tokens`): an online input that arrives meanwhile waits for that pass (design note 51).
    recent_batch_tokens: int | None = None


def batch_limits(
    device: str, threads: int, *, max_tokens: int | None = None, max_wait_ms: float | None = None
) -> BatchLimits:
    """The batching limits of a backend on `device` ("cpu", "cuda") whose passes use `threads` threads;
    explicit settings win over the device's defaults."""
    if device == "cpu":
        tokens = max_tokens if max_tokens is not None else CPU_BATCH_TOKENS_PER_THREAD * threads
        return BatchLimits(
            max_tokens=tokens,
            max_wait_ms=max_wait_ms if max_wait_ms is not None else CPU_BATCH_WAIT_MS,
            max_padding=CPU_MAX_PADDING,
            protect_last=True,
            recent_batch_tokens=recent_batch_tokens(tokens),
        )
    tokens = max_tokens if max_tokens is not None else GPU_BATCH_TOKENS
    return BatchLimits(
        max_tokens=tokens,
        max_wait_ms=max_wait_ms if max_wait_ms is not None else GPU_BATCH_WAIT_MS,
        max_padding=MAX_PADDING,
        fill=True,
        recent_batch_tokens=recent_batch_tokens(tokens),
    )


def recent_batch_tokens(max_tokens: int) -> int:
    """The token slots of a pass of batch inputs alone while online work is recent."""
    return max(1, int(max_tokens * RECENT_BATCH_SHARE))


@dataclass(frozen=True, slots=True)
class MemoryRoom:
    """What a batch's pass may hold at its peak: `room` bytes, by the model's estimate."""

    model: MemoryModel
    room: float

    def rows(self, length: int) -> int:
        return self.model.rows_that_fit(length, self.room)


def first_up(pending: Sequence[Waiting]) -> list[Waiting]:
    """The inputs the next batch is packed from: the online ones while any waits, else the batch ones.
    (A batch input is only ever delayed by online work, and goes as soon as none waits.)"""
    online = [item for item in pending if item.work == "online"]
    return online if online else list(pending)


def take_batch(
    pending: Sequence[Waiting],
    token_budget: int,
    max_items: int,
    max_padding: float = MAX_PADDING,
    *,
    protect_last: bool = False,
    memory: MemoryRoom | None = None,
    fill: bool = False,
    batch_tokens: int | None = None,
) -> tuple[list[Waiting], list[Waiting]]:
    """Split `pending` into (next batch, the rest). While an online input waits, the batch is packed from
    the online inputs alone (`fill`: batch inputs then take the room it leaves, where a wider pass costs
    little more, on a GPU); otherwise from the batch inputs, under `batch_tokens` (default
    `token_budget`). Within the class packed, a batch costs `len(batch) * longest` token slots (padding
    included): the oldest waiting input always goes (no starvation), with the inputs closest to it in
    length, in the window that embeds the most real tokens among those that fit the budget and waste at
    most `max_padding` of their real tokens on padding. The batch is never empty if `pending` is not,
    unless the oldest input of the class does not fit the memory room now (it waits for room; nothing
    overtakes it); an input longer than the budget goes alone. `protect_last`: no input younger than a
    request's last waiting input goes without it (on CPU, where each input added lengthens the pass)."""
    if not pending:
        return [], []
    up = first_up(pending)
    if up[0].work == "batch":
        budget = token_budget if batch_tokens is None else batch_tokens
        return _take(up, budget, max_items, max_padding, protect_last, memory)
    if len(up) == len(pending):  # online inputs alone: the common case, as before classes
        return _take(pending, token_budget, max_items, max_padding, protect_last, memory)
    batch, _ = _take(up, token_budget, max_items, max_padding, protect_last, memory)
    if fill and batch:
        background = [item for item in pending if item.work == "batch"]
        batch += _fill(batch, background, token_budget, max_items, max_padding, memory)
    chosen = {item.seq for item in batch}
    return batch, [item for item in pending if item.seq not in chosen]


def _fill(
    batch: Sequence[Waiting],
    candidates: Sequence[Waiting],
    token_budget: int,
    max_items: int,
    max_padding: float,
    memory: MemoryRoom | None,
) -> list[Waiting]:
    """The inputs of `candidates` that join `batch` without lengthening its pass: none longer than its
    longest, the longest first (the least padding), oldest first among equals, while the rows fit the
    budget, the items and the memory room and the padding stays within `max_padding`."""
    longest = max(max(item.length, 1) for item in batch)
    rows = min(max_items, token_budget // longest)
    if memory is not None:
        rows = min(rows, memory.rows(longest))
    real = sum(max(item.length, 1) for item in batch)
    added: list[Waiting] = []
    for item in sorted((c for c in candidates if c.length <= longest), key=lambda c: (-c.length, c.seq)):
        if len(batch) + len(added) >= rows:
            break
        if (len(batch) + len(added) + 1) * longest > (1 + max_padding) * (real + max(item.length, 1)):
            break  # the candidates left are shorter still: they would pad more
        added.append(item)
        real += max(item.length, 1)
    return added


def _take(
    pending: Sequence[Waiting],
    token_budget: int,
    max_items: int,
    max_padding: float,
    protect_last: bool,
    memory: MemoryRoom | None,
) -> tuple[list[Waiting], list[Waiting]]:
    """take_batch within one class (`pending` not empty)."""
    by_age = sorted(pending, key=lambda item: item.seq)
    if memory is not None and memory.rows(by_age[0].length) < 1:
        return [], list(pending)
    last = last_waiting(pending, by_age[0]) if protect_last else []
    if not last:
        return _best_window(pending, token_budget, max_items, max_padding, memory)
    # The batch may hold inputs younger than a request's last waiting input only if it holds that
    # input too: try "everything older than the k-th such input, the k-1 before it included",
    # k = 1, 2, ..., while those k-1 fit in the best window, and keep the window with the most tokens.
    best: list[Waiting] = []
    best_real = 0
    position = {item.seq: i for i, item in enumerate(by_age)}
    for k, bound in enumerate([*last, None]):
        candidates = by_age if bound is None else by_age[: position[bound]]
        batch, _ = _best_window(candidates, token_budget, max_items, max_padding, memory)
        chosen = {item.seq for item in batch}
        if not all(seq in chosen for seq in last[:k]):
            break
        real = sum(item.length for item in batch)
        if not best or real > best_real:
            best, best_real = batch, real
    chosen = {item.seq for item in best}
    return best, [item for item in pending if item.seq not in chosen]


def _best_window(
    pending: Sequence[Waiting],
    token_budget: int,
    max_items: int,
    max_padding: float,
    memory: MemoryRoom | None = None,
) -> tuple[list[Waiting], list[Waiting]]:
    """The batch around the oldest of `pending` (not empty; the oldest fits `memory`), and the
    rest."""
    ordered = sorted(pending, key=lambda item: (item.length, item.seq))  # by length, stable by age
    lengths = [max(item.length, 1) for item in ordered]
    anchor = min(range(len(ordered)), key=lambda i: ordered[i].seq)
    prefix = [0, *accumulate(lengths)]

    def wasteful(lo: int, hi: int) -> bool:
        return (hi - lo) * lengths[hi - 1] > (1 + max_padding) * (prefix[hi] - prefix[lo])

    best_lo, best_hi, best_real = anchor, anchor + 1, lengths[anchor]
    # A window [lo, hi) holding the anchor is padded to lengths[hi - 1]. For a fixed hi, moving lo left
    # only adds shorter items, which lowers the mean length and so raises the padding share
    # monotonically: binary-search the leftmost lo that is not wasteful.
    for hi in range(anchor + 1, len(ordered) + 1):
        capacity = min(max_items, token_budget // lengths[hi - 1])
        if memory is not None:
            capacity = min(capacity, memory.rows(lengths[hi - 1]))
        lo_min = max(0, hi - capacity)
        if lo_min > anchor:
            break  # longer right ends only shrink the capacity further
        if wasteful(anchor, hi):
            continue
        left, right = lo_min, anchor  # invariant: `right` is not wasteful
        while left < right:
            mid = (left + right) // 2
            if wasteful(mid, hi):
                left = mid + 1
            else:
                right = mid
        real = prefix[hi] - prefix[right]
        if real > best_real:
            best_lo, best_hi, best_real = right, hi, real
    batch = ordered[best_lo:best_hi]
    rest = ordered[:best_lo] + ordered[best_hi:]
    return batch, rest


def last_waiting(pending: Sequence[Waiting], oldest: Waiting) -> list[int]:
    """The `seq`s, oldest first, of the waiting inputs other than `oldest` that are the last their
    request still waits for: a younger input that goes before one of them makes its caller wait
    longer. (An input whose request has others waiting may be overtaken: its caller waits for those
    anyway.)"""
    waiting = Counter(item.caller for item in pending)
    return sorted(item.seq for item in pending if item.seq != oldest.seq and waiting[item.caller] == 1)
