"""The pure parts of bounded tokenization: where a request's tokenization stops (scan), how its texts
go to the tokenizer threads (chunks), and the upper bound of its tokens before it is tokenized."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedserve.tokenization import (
    CHUNK_CHARS,
    CHUNK_INPUTS,
    Framing,
    Stop,
    TokenLimits,
    next_chunk,
    scan,
    upper_bound,
)

LIMITS = TokenLimits(per_input=8, truncate=False, total=20)


@pytest.mark.parametrize(
    ("lengths", "seen", "limits", "expected"),
    [
        ([3, 4, 5], 0, LIMITS, (3, None)),
        ([3, 9, 5], 0, LIMITS, (2, Stop.INPUT)),  # the over-long input is counted in: the evidence
        ([8, 8, 8], 0, LIMITS, (3, Stop.TOTAL)),
        ([5], 16, LIMITS, (1, Stop.TOTAL)),  # earlier chunks count
        ([4, 4, 4], 0, TokenLimits(per_input=8, truncate=False, total=100, budget=7), (2, Stop.BUDGET)),
        ([6, 2], 0, TokenLimits(per_input=8, truncate=False, total=100, refuse_above=5), (1, Stop.INPUT)),
        ([8, 8], 0, TokenLimits(per_input=8, truncate=True, total=100), (2, None)),
        ([9, 1], 0, TokenLimits(per_input=8, truncate=False, total=5, budget=3), (1, Stop.INPUT)),
    ],
)
def test_scan_stops_at_the_first_limit_broken(
    lengths: list[int], seen: int, limits: TokenLimits, expected: tuple[int, Stop | None]
) -> None:
    assert scan([[1] * n for n in lengths], limits, seen) == expected


@given(st.lists(st.integers(0, 5000), max_size=700), st.integers(10, 3000))
def test_chunks_cover_every_text_once_in_order_within_their_bounds(sizes: list[int], window: int) -> None:
    texts = ["x" * n for n in sizes]
    ranges, start = [], 0
    while start < len(texts):
        ranges.append((start, end := next_chunk(texts, start, window)))
        start = end
    assert [i for start, end in ranges for i in range(start, end)] == list(range(len(texts)))
    for start, end in ranges:
        assert end - start <= CHUNK_INPUTS
        if any(len(t) > window for t in texts[start:end]):
            assert end - start == 1, "a text read by windows goes alone"
        elif end - start > 1:
            assert sum(len(t) for t in texts[start:end]) <= CHUNK_CHARS


def test_the_upper_bound_counts_bytes_framing_and_prompt_and_caps_each_input() -> None:
    assert upper_bound(["abc", "é"], "", per_input=100, framing_size=2) == (3 + 4) + (2 + 4)
    assert upper_bound(["abc"], "q: ", per_input=100, framing_size=0) == 3 + 3 + 2
    assert upper_bound(["x" * 1000, "y"], "", per_input=10, framing_size=2) == 10 + 5


def test_framing_frames_and_recognises_its_own_ids() -> None:
    bert = Framing(head=(101,), tail=(102,))
    assert bert.frame([7, 8]) == [101, 7, 8, 102]
    assert bert.frames([101, 7, 102]) and not bert.frames([7, 8, 9]) and not bert.frames([101])
    assert Framing(head=(), tail=()).frames([5])  # a tokenizer that adds nothing frames everything
