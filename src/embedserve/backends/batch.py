"""The padded batch a backend reads: id sequences -> [B, T] ids and attention mask (pure)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedserve.types import PaddingSide, TokenBatch


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
            input_ids[row, longest - n :] = seq
            mask[row, longest - n :] = 1
    return TokenBatch(
        input_ids=input_ids, attention_mask=mask, real_tokens=sum(len(seq) for seq in sequences)
    )
