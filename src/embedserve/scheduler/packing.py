"""Pure batch packing: which waiting inputs go into the next forward pass, and how they are padded.

A batch costs `len(batch) * longest` token slots (padding included). We always serve the oldest
waiting input (no starvation) and surround it with the inputs closest to it in length that fit the
budget, choosing among such windows the one that embeds the most real tokens."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import numpy as np

from embedserve.types import PaddingSide, TokenBatch, WorkItem


def take_batch(pending: Sequence[WorkItem], token_budget: int, max_items: int
               ) -> tuple[list[WorkItem], list[WorkItem]]:
    """Split `pending` into (next batch, the rest). The batch is never empty if `pending` is not;
    an input longer than the budget goes alone."""
    if not pending:
        return [], []
    ordered = sorted(pending, key=lambda item: (item.length, item.seq))  # by length, stable by age
    lengths = [item.length for item in ordered]
    anchor = min(range(len(ordered)), key=lambda i: ordered[i].seq)
    prefix = [0, *accumulate(lengths)]

    best_lo, best_hi, best_real = anchor, anchor + 1, lengths[anchor]
    # The window [lo, hi) is padded to lengths[hi - 1]. For each right end at or after the anchor, the
    # window extends left as far as the budget allows; stop once the anchor no longer fits.
    for hi in range(anchor + 1, len(ordered) + 1):
        longest = lengths[hi - 1]
        capacity = min(max_items, token_budget // max(longest, 1))
        lo = max(0, hi - capacity)
        if lo > anchor:
            break
        real = prefix[hi] - prefix[lo]
        if real > best_real:
            best_lo, best_hi, best_real = lo, hi, real
    batch = ordered[best_lo:best_hi]
    rest = ordered[:best_lo] + ordered[best_hi:]
    return batch, rest


def collate(sequences: Sequence[Sequence[int]], pad_id: int, side: PaddingSide) -> TokenBatch:
    """Pad id sequences into a [B, T] matrix with its attention mask."""
    longest = max(len(seq) for seq in sequences)
    input_ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)  # [B, T]
    mask = np.zeros((len(sequences), longest), dtype=np.int64)  # [B, T]
    for row, seq in enumerate(sequences):
        n = len(seq)
        if side == "right":
            input_ids[row, :n] = seq
            mask[row, :n] = 1
        else:
            input_ids[row, longest - n:] = seq
            mask[row, longest - n:] = 1
    return TokenBatch(input_ids=input_ids, attention_mask=mask,
                      real_tokens=sum(len(seq) for seq in sequences))
