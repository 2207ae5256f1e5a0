"""Pooling on torch tensors, driven by the attention mask so that left and right padding give the same
vector: cls = first real token, last_token = last real token, mean = mask-weighted mean, splade = the
max over real tokens of log(1 + relu(logit)) (its input is a masked LM's [B, T, V] logits)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from embedserve.types import Pooling


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    first = mask.int().argmax(dim=1)  # [B] argmax returns the first maximum
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]  # [B, H]


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    t = mask.shape[1]
    last = t - 1 - mask.int().flip(dims=[1]).argmax(dim=1)  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    summed = (hidden * weights).sum(dim=1)  # [B, H]
    counts = weights.sum(dim=1).clamp(min=1e-9)  # [B, 1]
    return summed / counts


def splade_pool(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # sentence-transformers' SpladePooling: padded positions are zeroed before the relu, so they add 0.
    # log(1 + relu(x)) rises with x, so the max of the weights is the weight of the max logit: the
    # transform runs on [B, V], and the mask in place, so a pass holds its logits once, not three
    # times (design note 58). The logits are the pass's own, so overwriting them is safe.
    masked = logits.masked_fill_(mask.unsqueeze(-1) == 0, 0.0)  # [B, T, V]
    return torch.log1p(torch.relu(masked.amax(dim=1)))  # [B, V]


POOLERS: dict[Pooling, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": cls_pool,
    "mean": mean_pool,
    "last_token": last_token_pool,
    "splade": splade_pool,
}


def pool(kind: Pooling, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] hidden states (splade: [B, T, V] logits), [B, T] mask -> [B, H] ([B, V])."""
    return POOLERS[kind](hidden, mask)
