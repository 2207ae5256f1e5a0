"""embedserve.backends.pooling: mask-driven pooling, so that the padding side never changes a vector."""

from __future__ import annotations

import typing

import pytest
import torch

from embedserve.backends.pooling import POOLERS, pool
from embedserve.types import Pooling

POOLING_KINDS = typing.get_args(Pooling)
H = 6


def test_every_pooling_kind_has_a_pooler() -> None:
    assert POOLING_KINDS, "the Pooling literal lists the supported kinds"
    assert set(POOLERS) == set(POOLING_KINDS)
    for kind in POOLING_KINDS:
        assert callable(POOLERS[kind])


def padded(
    tokens: torch.Tensor, width: int, side: str, pad_value: float = 1e4
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, H] real hidden states -> ([1, width, H] hidden with garbage in the padding, [1, width] mask)."""
    n = tokens.shape[0]
    hidden = torch.full((1, width, H), pad_value)  # [1, T, H]
    mask = torch.zeros((1, width), dtype=torch.int64)  # [1, T]
    span = slice(0, n) if side == "right" else slice(width - n, width)
    hidden[0, span] = tokens
    mask[0, span] = 1
    return hidden, mask


def expected(kind: str, tokens: torch.Tensor) -> torch.Tensor:
    """splade: `tokens` stand for MLM logits [n, V], pooled as sentence-transformers' SpladePooling."""
    splade = torch.log1p(torch.relu(tokens)).amax(dim=0)
    return {"cls": tokens[0], "last_token": tokens[-1], "mean": tokens.mean(dim=0), "splade": splade}[kind]


@pytest.mark.parametrize("kind", POOLING_KINDS)
@pytest.mark.parametrize("n", [1, 3, 7])
def test_left_and_right_padding_give_the_same_vector(kind: Pooling, n: int) -> None:
    tokens = torch.randn(n, H, generator=torch.Generator().manual_seed(n))
    right = pool(kind, *padded(tokens, 7, "right"))
    left = pool(kind, *padded(tokens, 7, "left"))
    assert right.shape == (1, H)
    torch.testing.assert_close(left, right)
    torch.testing.assert_close(right[0], expected(kind, tokens))


@pytest.mark.parametrize("kind", POOLING_KINDS)
def test_each_row_of_a_mixed_batch_is_pooled_over_its_own_tokens(kind: Pooling) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, H, generator=gen) for n in (2, 5, 4)]
    for side in ("left", "right"):
        parts = [padded(row, 5, side) for row in rows]
        hidden = torch.cat([h for h, _ in parts])  # [3, 5, H]
        mask = torch.cat([m for _, m in parts])  # [3, 5]
        out = pool(kind, hidden, mask)
        assert out.shape == (3, H)
        for i, row in enumerate(rows):
            torch.testing.assert_close(out[i], expected(kind, row))


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_ignores_padded_positions(side: str) -> None:
    tokens = torch.tensor([[1.0] * H, [3.0] * H])
    for pad_value in (0.0, -50.0, 1e6):
        out = pool("mean", *padded(tokens, 6, side, pad_value=pad_value))
        torch.testing.assert_close(out[0], torch.full((H,), 2.0))


def test_mean_accepts_a_boolean_mask() -> None:
    tokens = torch.tensor([[2.0] * H, [4.0] * H])
    hidden, mask = padded(tokens, 4, "right")
    torch.testing.assert_close(pool("mean", hidden, mask.bool())[0], torch.full((H,), 3.0))


@pytest.mark.parametrize("kind", POOLING_KINDS)
def test_pooling_keeps_the_hidden_dtype(kind: Pooling) -> None:
    hidden, mask = padded(torch.randn(3, H), 4, "left")
    assert pool(kind, hidden.to(torch.float64), mask).dtype == torch.float64


@pytest.mark.parametrize("side", ["left", "right"])
def test_splade_pooling_equals_sentence_transformers_splade_pooling(side: str) -> None:
    """The max of log(1 + relu) over tokens is taken as the transform of the max logit: the same numbers
    as sentence-transformers' module, padded positions (their garbage logits) and all-negative ids
    (weight 0) included."""
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    gen = torch.Generator().manual_seed(1)
    vocab, width = 50, 6
    logits = torch.randn(3, width, vocab, generator=gen) * 4 - 1  # [B, T, V], many ids all negative
    mask = torch.zeros(3, width, dtype=torch.int64)
    for row, n in enumerate((1, 4, 6)):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    logits[mask == 0] = 1e4  # padding must not count
    reference = SpladePooling("max", "relu").eval()(
        {"token_embeddings": logits.clone(), "attention_mask": mask}
    )["sentence_embedding"]
    ours = pool("splade", logits.clone(), mask)
    assert (reference == 0).any() and (reference > 0).any()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
