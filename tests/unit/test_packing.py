"""embedserve.scheduler.packing: which waiting inputs form the next batch (online inputs before batch
ones), and how a batch is padded."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest

from embedserve.backends.batch import collate
from embedserve.scheduler.memory import MemoryModel
from embedserve.scheduler.packing import (
    CPU_BATCH_TOKENS_PER_THREAD,
    CPU_BATCH_WAIT_MS,
    CPU_MAX_PADDING,
    GPU_BATCH_TOKENS,
    GPU_BATCH_WAIT_MS,
    MAX_PADDING,
    BatchLimits,
    MemoryRoom,
    Waiting,
    batch_limits,
    first_up,
    last_waiting,
    take_batch,
)
from embedserve.types import WorkClass


def make_items(
    lengths: Sequence[int],
    seqs: Sequence[int] | None = None,
    requests: Sequence[int | None] | None = None,
    work: str | None = None,
) -> list[Waiting]:
    """Waiting inputs with the given lengths; seq defaults to the list position (the first is the
    oldest). By default all are inputs of one request (caller 0), free to be packed in any order; pass
    `requests` (None: a one-input request, its own caller) to see the rule that protects a request's last
    input. `work`: each input's class, "o" (online, the default) or "b" (batch), one letter each."""
    seqs = range(len(lengths)) if seqs is None else seqs
    requests = [0] * len(lengths) if requests is None else requests
    work = "o" * len(lengths) if work is None else work
    classes: dict[str, WorkClass] = {"o": "online", "b": "batch"}
    return [
        Waiting(seq=seq, length=length, caller=seq if request is None else request, work=classes[letter])
        for length, seq, request, letter in zip(lengths, seqs, requests, work, strict=True)
    ]


def padded_cost(batch: Sequence[Waiting]) -> int:
    return len(batch) * max(item.length for item in batch)


def assert_partition(pending: Sequence[Waiting], batch: Sequence[Waiting], rest: Sequence[Waiting]) -> None:
    assert sorted(item.seq for item in [*batch, *rest]) == sorted(item.seq for item in pending)


# ---- take_batch ----------------------------------------------------------------------------------


def test_empty_pending_gives_an_empty_batch_and_rest() -> None:
    assert take_batch([], token_budget=100, max_items=8) == ([], [])


@pytest.mark.parametrize(
    ("lengths", "seqs"),
    [
        ([10, 3, 50, 7], [3, 0, 1, 2]),
        ([1, 1, 1, 400], [1, 2, 3, 0]),
        ([400, 1, 1, 1], [1, 2, 3, 0]),
        ([8] * 10, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]),
    ],
)
def test_the_oldest_item_is_always_in_the_batch(lengths: list[int], seqs: list[int]) -> None:
    pending = make_items(lengths, seqs)
    batch, rest = take_batch(pending, token_budget=64, max_items=4)
    assert min(pending, key=lambda item: item.seq) in batch
    assert_partition(pending, batch, rest)


def test_an_item_longer_than_the_budget_goes_alone() -> None:
    pending = make_items([500, 3, 3, 3])
    batch, rest = take_batch(pending, token_budget=100, max_items=8)
    assert batch == [pending[0]]
    assert_partition(pending, batch, rest)


def test_items_that_fit_together_go_in_one_batch() -> None:
    pending = make_items([4, 4, 4, 4])
    batch, rest = take_batch(pending, token_budget=100, max_items=8)
    assert sorted(item.seq for item in batch) == [0, 1, 2, 3]
    assert rest == []


def test_max_items_caps_the_batch() -> None:
    pending = make_items([2] * 10)
    batch, rest = take_batch(pending, token_budget=10_000, max_items=3)
    assert len(batch) == 3
    assert pending[0] in batch
    assert len(rest) == 7


def test_padded_cost_stays_within_the_token_budget() -> None:
    pending = make_items([10, 30, 20, 30, 10, 25])
    batch, _ = take_batch(pending, token_budget=60, max_items=16)
    assert padded_cost(batch) <= 60


@pytest.mark.parametrize(
    "lengths",
    [
        [5, 5, 5, 200, 200, 200],
        [5, 4, 5, 200, 200, 200],  # the oldest is not the shortest of the short items
        [6, 5, 5, 5, 200, 200, 200],
    ],
)
def test_short_items_are_not_padded_to_long_ones_when_that_is_wasteful(lengths: list[int]) -> None:
    # The short items together cost a few slots, all real; adding a 200-token item fills the 600-slot
    # budget with hundreds of slots of padding. The oldest (short) item goes with the other short
    # ones, and the long ones get their own batch.
    pending = make_items(lengths)
    batch, rest = take_batch(pending, token_budget=600, max_items=16)
    assert pending[0] in batch
    assert sorted(item.length for item in batch) == sorted(n for n in lengths if n < 200)
    assert sorted(item.length for item in rest) == [n for n in lengths if n == 200]


def test_the_oldest_long_item_is_grouped_with_other_long_items() -> None:
    pending = make_items([200, 5, 5, 5, 200, 200])
    batch, rest = take_batch(pending, token_budget=600, max_items=16)
    assert pending[0] in batch
    assert sorted(item.length for item in batch) == [200, 200, 200]
    assert_partition(pending, batch, rest)


def test_items_closest_in_length_to_the_oldest_are_preferred() -> None:
    pending = make_items([50, 1, 49, 51, 100, 2])
    batch, _ = take_batch(pending, token_budget=160, max_items=3)
    assert pending[0] in batch
    assert sorted(item.length for item in batch) == [49, 50, 51]


@pytest.mark.parametrize("seed", range(300))
def test_random_pending_sets_keep_every_invariant(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    long_tail = rng.random() < 0.3
    lengths = [rng.randint(1, 600 if long_tail else 64) for _ in range(n)]
    seqs = rng.sample(range(1000), n)
    token_budget = rng.choice([1, 16, 64, 256, 512, 2048])
    max_items = rng.randint(1, 32)
    pending = make_items(lengths, seqs)

    batch, rest = take_batch(pending, token_budget=token_budget, max_items=max_items)

    assert batch, "a non-empty pending list gives a non-empty batch"
    assert_partition(pending, batch, rest)
    assert len({item.seq for item in batch}) == len(batch)
    assert min(pending, key=lambda item: item.seq) in batch
    assert len(batch) <= max_items
    assert padded_cost(batch) <= token_budget or len(batch) == 1


@pytest.mark.parametrize("max_padding", [CPU_MAX_PADDING, MAX_PADDING])
@pytest.mark.parametrize("seed", range(100))
def test_a_batch_of_several_items_never_pads_beyond_the_tolerance(seed: int, max_padding: float) -> None:
    rng = random.Random(seed)
    pending = make_items([rng.randint(1, 250) for _ in range(rng.randint(1, 130))])
    while pending:
        batch, pending = take_batch(pending, token_budget=16_384, max_items=256, max_padding=max_padding)
        real = sum(item.length for item in batch)
        assert len(batch) == 1 or padded_cost(batch) <= (1 + max_padding) * real


def test_cpu_batches_are_smaller_tighter_and_never_wait_unlike_gpu_batches() -> None:
    cpu, cuda = batch_limits("cpu", 1), batch_limits("cuda", 1)
    assert cpu == BatchLimits(
        max_tokens=CPU_BATCH_TOKENS_PER_THREAD,
        max_wait_ms=CPU_BATCH_WAIT_MS,
        max_padding=CPU_MAX_PADDING,
        protect_last=True,
        recent_batch_tokens=CPU_BATCH_TOKENS_PER_THREAD // 4,
    )
    assert cuda == BatchLimits(
        max_tokens=GPU_BATCH_TOKENS,
        max_wait_ms=GPU_BATCH_WAIT_MS,
        max_padding=MAX_PADDING,
        fill=True,
        recent_batch_tokens=GPU_BATCH_TOKENS // 4,
    )
    assert cpu.max_tokens < cuda.max_tokens and cpu.max_padding < cuda.max_padding
    assert cpu.max_wait_ms == 0 < cuda.max_wait_ms
    assert cpu.protect_last and not cuda.protect_last  # on a GPU a wider batch costs little more
    assert cuda.fill and not cpu.fill  # the same: batch inputs may widen an online pass only there


def test_a_cpu_pass_on_more_threads_takes_more_tokens() -> None:
    assert batch_limits("cpu", 4).max_tokens == 4 * batch_limits("cpu", 1).max_tokens
    assert batch_limits("cuda", 4).max_tokens == batch_limits("cuda", 1).max_tokens


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_batch_settings_win_over_the_device_defaults(device: str) -> None:
    limits = batch_limits(device, 2, max_tokens=999, max_wait_ms=7.5)
    assert (limits.max_tokens, limits.max_wait_ms) == (999, 7.5)
    assert limits.recent_batch_tokens == 249  # a pass of batch inputs while online is recent: a quarter
    assert batch_limits(device, 2, max_wait_ms=0.0).max_wait_ms == 0.0  # an explicit 0 is kept


def test_a_tighter_tolerance_pads_less_over_a_whole_queue() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(5, 250) for _ in range(128)]

    def slots(max_padding: float) -> int:
        pending, total = make_items(lengths), 0
        while pending:
            batch, pending = take_batch(pending, 16_384, 256, max_padding)
            total += padded_cost(batch)
        return total

    assert slots(CPU_MAX_PADDING) <= 1.05 * sum(lengths) < slots(MAX_PADDING)


def test_draining_pending_eventually_serves_every_item() -> None:
    rng = random.Random(7)
    pending = make_items([rng.randint(1, 300) for _ in range(200)])
    served: list[Waiting] = []
    while pending:
        batch, pending = take_batch(pending, token_budget=512, max_items=16)
        served.extend(batch)
    assert sorted(item.seq for item in served) == list(range(200))


# ---- collate -------------------------------------------------------------------------------------


def test_collate_right_padding_puts_tokens_first() -> None:
    batch = collate([[5, 6, 7], [8], [9, 10]], pad_id=0, side="right")
    np.testing.assert_array_equal(batch.input_ids, [[5, 6, 7], [8, 0, 0], [9, 10, 0]])
    np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    assert batch.real_tokens == 6
    assert batch.shape == (3, 3)
    assert batch.input_ids.dtype == np.int64
    assert batch.attention_mask.dtype == np.int64


def test_collate_left_padding_puts_tokens_last() -> None:
    batch = collate([[5, 6, 7], [8], [9, 10]], pad_id=99, side="left")
    np.testing.assert_array_equal(batch.input_ids, [[5, 6, 7], [99, 99, 8], [99, 9, 10]])
    np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    assert batch.real_tokens == 6


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_of_equal_lengths_has_no_padding(side: str) -> None:
    batch = collate([[1, 2], [3, 4]], pad_id=0, side=side)  # type: ignore[arg-type]
    np.testing.assert_array_equal(batch.input_ids, [[1, 2], [3, 4]])
    assert batch.attention_mask.all()
    assert batch.real_tokens == 4


# ---- a request's last waiting input is never overtaken by a younger request's input ----------------


def test_one_input_requests_are_not_overtaken_by_younger_ones_of_their_length() -> None:
    """Online callers: the two younger 200-token inputs would batch with the oldest, but the 5-token
    callers between them would then wait behind a batch they are older than."""
    pending = make_items([200, 5, 5, 5, 200, 200], requests=[None] * 6)
    batch, rest = take_batch(pending, token_budget=600, max_items=16, protect_last=True)
    assert batch == [pending[0]]
    assert_partition(pending, batch, rest)


def test_one_input_requests_in_arrival_order_still_share_a_batch() -> None:
    pending = make_items([4, 4, 4, 4, 40], requests=[None] * 5)
    batch, rest = take_batch(pending, token_budget=100, max_items=8, protect_last=True)
    assert sorted(item.seq for item in batch) == [0, 1, 2, 3]
    assert rest == [pending[4]]


def test_an_input_whose_request_has_others_waiting_may_be_overtaken() -> None:
    """Request 0 waits for both of its inputs anyway: request 2's input may go before its short one."""
    pending = make_items([50, 5, 50], requests=[0, 0, None])
    batch, rest = take_batch(pending, token_budget=1000, max_items=8, protect_last=True)
    assert sorted(item.seq for item in batch) == [0, 2]
    assert rest == [pending[1]]


def test_a_younger_input_waits_when_it_would_pass_a_lone_input() -> None:
    pending = make_items([50, 5, 50], requests=[0, None, None])
    batch, _ = take_batch(pending, token_budget=1000, max_items=8, protect_last=True)
    assert batch == [pending[0]]


def test_last_waiting_counts_inputs_per_request() -> None:
    pending = make_items([1, 1, 1, 1, 1], requests=[None, 7, 7, 9, None])
    assert last_waiting(pending, pending[0]) == [3, 4]  # request 7 has two waiting; 0 is the oldest


@pytest.mark.parametrize("seed", range(200))
def test_no_batch_leaves_behind_an_older_last_input(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    lengths = [rng.randint(1, 64) for _ in range(n)]
    requests: list[int | None] = [rng.choice([None, 0, 1, 2]) for _ in range(n)]
    pending = make_items(lengths, seqs=rng.sample(range(1000), n), requests=requests)
    batch, rest = take_batch(
        pending, token_budget=rng.choice([64, 256, 1024]), max_items=16, protect_last=True
    )
    assert_partition(pending, batch, rest)
    assert min(pending, key=lambda item: item.seq) in batch
    youngest = max(item.seq for item in batch)
    oldest = min(pending, key=lambda item: item.seq)
    for seq in last_waiting(pending, oldest):
        if seq < youngest:
            assert any(item.seq == seq for item in batch), (lengths, requests)


# ---- memory ---------------------------------------------------------------------------------------

#: 1 KB per token slot plus 10 bytes per row and squared length.
MEMORY = MemoryModel(per_token=1000.0, per_square=10.0)


def test_a_batch_fits_the_memory_room() -> None:
    pending = make_items([100] * 20)
    room = MemoryRoom(MEMORY, MEMORY.peak(5, 100))
    batch, rest = take_batch(pending, 16_384, 256, memory=room)
    assert len(batch) == 5 and len(rest) == 15
    assert MEMORY.peak(len(batch), 100) <= room.room


def test_the_oldest_input_that_does_not_fit_the_room_waits_and_nothing_overtakes_it() -> None:
    pending = make_items([400, 10, 10, 10])  # the oldest is long, the others would fit
    room = MemoryRoom(MEMORY, MEMORY.peak(1, 399))
    batch, rest = take_batch(pending, 16_384, 256, memory=room)
    assert batch == [] and rest == pending
    batch, _ = take_batch(pending, 16_384, 256, protect_last=True, memory=room)
    assert batch == []


@pytest.mark.parametrize("seed", range(20))
def test_random_queues_never_pack_past_the_memory_room(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 600) for _ in range(rng.randint(1, 60))]
    pending = make_items(lengths, requests=[rng.choice([None, 0, 1]) for _ in lengths])
    room = MemoryRoom(MEMORY, rng.uniform(MEMORY.peak(1, 600), MEMORY.peak(40, 600)))
    while pending:
        batch, pending = take_batch(pending, 4096, 64, protect_last=bool(seed % 2), memory=room)
        assert batch, "every input here fits the room alone"
        assert MEMORY.peak(len(batch), max(item.length for item in batch)) <= room.room


# ---- work classes: online inputs first, batch inputs in idle capacity -------------------------------


@pytest.mark.parametrize(
    ("lengths", "work", "expected"),
    [
        ([10, 10, 10], "bbo", [2]),  # the batch inputs are older, and would share the pass
        ([10, 10, 10, 10], "bobo", [1, 3]),
        ([5, 200, 5], "bob", [1]),  # a short batch input would fit beside it: no fill by default
        ([10, 10], "oo", [0, 1]),
        ([10, 10, 400], "bbo", [2]),  # even an online input that goes alone
    ],
)
def test_while_an_online_input_waits_the_batch_holds_online_inputs_only(
    lengths: list[int], work: str, expected: list[int]
) -> None:
    pending = make_items(lengths, work=work)
    batch, rest = take_batch(pending, token_budget=256, max_items=16, protect_last=True)
    assert sorted(item.seq for item in batch) == expected
    assert_partition(pending, batch, rest)


@pytest.mark.parametrize(
    ("lengths", "work", "expected"),
    [
        ([10, 10, 10], "bbb", [0, 1, 2]),
        ([50, 10, 10], "bbb", [0]),  # packed as any class is: the oldest goes, the tolerance holds
        ([10, 10], "b" * 2, [0, 1]),
    ],
)
def test_with_no_online_input_waiting_batch_inputs_form_the_pass(
    lengths: list[int], work: str, expected: list[int]
) -> None:
    pending = make_items(lengths, work=work)
    batch, rest = take_batch(pending, token_budget=256, max_items=16, max_padding=CPU_MAX_PADDING)
    assert sorted(item.seq for item in batch) == expected
    assert_partition(pending, batch, rest)


def test_first_up_is_the_online_inputs_while_any_waits_else_the_batch_ones() -> None:
    pending = make_items([1, 2, 3, 4], work="bobo")
    assert [item.seq for item in first_up(pending)] == [1, 3]
    batch_only = make_items([1, 2], work="bb")
    assert first_up(batch_only) == batch_only


def test_the_batch_token_limit_holds_passes_of_batch_inputs_alone_not_online_ones() -> None:
    batch_inputs = make_items([20] * 10, work="b" * 10)
    batch, _ = take_batch(batch_inputs, token_budget=200, max_items=16, batch_tokens=40)
    assert len(batch) == 2
    online = make_items([20] * 10)
    batch, _ = take_batch(online, token_budget=200, max_items=16, batch_tokens=40)
    assert len(batch) == 10
    long = make_items([100, 20], work="bb")  # longer than that limit: it goes alone, as over any budget
    batch, _ = take_batch(long, token_budget=200, max_items=16, batch_tokens=40)
    assert batch == [long[0]]


@pytest.mark.parametrize(
    ("lengths", "work", "token_budget", "max_items", "expected"),
    [
        # The online pass is 100 long: the batch inputs of 100 and 95 join it (no longer pass, little
        # padding), the one of 101 would lengthen it and 20 would pad it beyond the tolerance.
        ([100, 100, 101, 95, 20], "obbbb", 1000, 16, [0, 1, 3]),
        ([100, 100, 100, 100], "obbb", 300, 16, [0, 1, 2]),  # within the token budget
        ([100, 100, 100, 100], "obbb", 1000, 2, [0, 1]),  # and the item limit
        ([100, 100, 100], "bob", 1000, 16, [0, 1, 2]),  # the oldest batch input is not skipped
        ([100, 100, 98, 100], "obbb", 1000, 16, [0, 1, 2, 3]),
    ],
)
def test_with_fill_batch_inputs_take_the_room_an_online_pass_leaves(
    lengths: list[int], work: str, token_budget: int, max_items: int, expected: list[int]
) -> None:
    pending = make_items(lengths, work=work)
    batch, rest = take_batch(pending, token_budget, max_items, MAX_PADDING, fill=True)
    assert sorted(item.seq for item in batch) == expected
    assert_partition(pending, batch, rest)
    online = [item for item in pending if item.work == "online"]
    assert max(item.length for item in batch) == max(item.length for item in online)


def test_fill_keeps_the_padding_tolerance_and_the_memory_room() -> None:
    pending = make_items([100, 50, 50, 50], work="obbb")
    batch, _ = take_batch(pending, 1000, 16, MAX_PADDING, fill=True)
    assert batch == [pending[0]]  # one 50 would make a third of its real tokens padding (limit 25%)
    pending = make_items([100] * 6, work="obbbbb")
    room = MemoryRoom(MEMORY, MEMORY.peak(3, 100))
    batch, _ = take_batch(pending, 16_384, 256, MAX_PADDING, memory=room, fill=True)
    assert len(batch) == 3 and batch[0] == pending[0]


def test_an_online_input_that_does_not_fit_the_room_waits_and_no_batch_input_overtakes_it() -> None:
    pending = make_items([400, 10, 10], work="obb")
    room = MemoryRoom(MEMORY, MEMORY.peak(1, 399))
    batch, rest = take_batch(pending, 16_384, 256, memory=room, fill=True)
    assert batch == [] and rest == pending


@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("seed", range(200))
def test_random_mixed_queues_put_online_first_and_serve_every_input(seed: int, fill: bool) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    lengths = [rng.randint(1, 300) for _ in range(n)]
    work = "".join(rng.choice("ob") for _ in range(n))
    requests: list[int | None] = [rng.choice([None, 0, 1]) for _ in range(n)]
    pending = make_items(lengths, seqs=rng.sample(range(1000), n), requests=requests, work=work)
    everything = sorted(item.seq for item in pending)
    token_budget, batch_tokens = rng.choice([64, 256, 1024]), rng.choice([None, 16, 64])
    served: list[Waiting] = []
    while pending:
        online = [item for item in pending if item.work == "online"]
        batch, rest = take_batch(
            pending,
            token_budget,
            16,
            protect_last=bool(seed % 2),
            fill=fill,
            batch_tokens=batch_tokens,
        )
        assert batch, "a non-empty queue gives a non-empty batch"
        assert_partition(pending, batch, rest)
        up = online or pending
        assert min(up, key=lambda item: item.seq) in batch, "the oldest of the class up goes"
        if online:
            assert any(item.work == "online" for item in batch)
            longest = max(item.length for item in batch if item.work == "online")
            assert fill or all(item.work == "online" for item in batch)
            assert all(item.length <= longest for item in batch), "a fill never lengthens the pass"
            limit = token_budget
        else:
            limit = token_budget if batch_tokens is None else batch_tokens
        assert len(batch) <= 16
        assert padded_cost(batch) <= limit or len(batch) == 1
        served.extend(batch)
        pending = rest
    assert sorted(item.seq for item in served) == everything
