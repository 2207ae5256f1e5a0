"""The padded batch a backend reads: id sequences -> [B, T] ids and attention mask, and a pass's outputs
back to one share per input (pure)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedserve.types import IntMatrix, PaddingSide, PassOutputs, RowOutputs, TokenBatch


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


def split_rows(outputs: PassOutputs, mask: IntMatrix) -> list[RowOutputs]:
    """A pass's outputs -> each row's: its pooled vector, and its per-token outputs at its real tokens
    ([B, T] mask), in order, so that left and right padding give the same shares."""
    rows: list[RowOutputs] = []
    for i in range(outputs.dense.shape[0]):
        real = mask[i].astype(bool)  # [T]
        weights = None if outputs.token_weights is None else outputs.token_weights[i, real]  # [n]
        vectors = None if outputs.token_vectors is None else outputs.token_vectors[i, real]  # [n, C]
        rows.append(RowOutputs(dense=outputs.dense[i], token_weights=weights, token_vectors=vectors))
    return rows
