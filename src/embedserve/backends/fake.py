"""A deterministic, torch-free backend for fast tests of the batcher, the engine and the whole app: each
token id maps to a fixed pseudo-random vector and a row is the mean over its real tokens, so a vector
depends only on that row's ids (any cross-talk between rows or requests shows up as a wrong vector).
With `heads`, a token's weight and ColBERT vector are functions of its id alone, for the same reason;
with `splade`, a row is its ids' weights over the vocabulary."""

from __future__ import annotations

import json

import numpy as np

from embedserve.backends.factory import BackendFactory
from embedserve.settings import Settings
from embedserve.spec import ModelSpec
from embedserve.types import FloatMatrix, PassOutputs, TokenBatch


class FakeBackend:
    def __init__(
        self,
        *,
        dimensions: int = 16,
        vocab_size: int = 1000,
        seed: int = 0,
        workers: int = 1,
        free_memory: int = 1 << 40,
        heads: bool = False,
        splade: bool = False,
    ) -> None:
        """`free_memory`: what `memory_available` reports (a pass costs it nothing). `heads`: per-token
        outputs as bge-m3's heads give them; `splade`: rows of `vocab_size` weights."""
        rng = np.random.default_rng(seed)
        self._table = rng.standard_normal((vocab_size, 16 if splade else dimensions)).astype(np.float32)
        self._heads, self._splade = heads, splade
        self.dimensions = dimensions
        self.vocab_size = vocab_size
        self.kind, self.device, self.precision = "fake", "cpu", "float32"
        self.description = "fake cpu float32"
        self.workers, self.threads = workers, 1
        self.attention_copies = 0  # it has no attention
        self.batches: list[tuple[int, int]] = []  # (rows, padded length) of every forward, for tests
        self.real_tokens: list[int] = []  # real (unpadded) tokens of every forward
        self.free_memory = free_memory

    def forward(self, batch: TokenBatch) -> FloatMatrix:
        self.batches.append(batch.shape)
        self.real_tokens.append(batch.real_tokens)
        if self._splade:
            return self._vocabulary_weights(batch)
        hidden = self._table[batch.input_ids]  # [B, T, D]
        mask = batch.attention_mask[..., None].astype(np.float32)  # [B, T, 1]
        out: FloatMatrix = ((hidden * mask).sum(axis=1) / mask.sum(axis=1)).astype(np.float32)
        return out

    def encode(self, batch: TokenBatch, *, tokens: bool) -> PassOutputs:
        dense = self.forward(batch)
        if not (tokens and self._heads):
            return PassOutputs(dense=dense)
        hidden = self._table[batch.input_ids]  # [B, T, D]
        return PassOutputs(dense=dense, token_weights=np.maximum(hidden[..., 0], 0), token_vectors=hidden)

    def _vocabulary_weights(self, batch: TokenBatch) -> FloatMatrix:
        """[B, V]: each real token's weight |table[id, 0]| at its id."""
        out = np.zeros((batch.shape[0], self.vocab_size), dtype=np.float32)  # [B, V]
        for row, (ids, mask) in enumerate(zip(batch.input_ids, batch.attention_mask, strict=True)):
            real = ids[mask.astype(bool)]
            out[row, real] = np.abs(self._table[real, 0])
        return out

    def reference(self, ids: list[int]) -> FloatMatrix:
        """The vector these ids get when they are alone in a batch (no padding, no neighbours)."""
        out: FloatMatrix = self._table[np.asarray(ids)].mean(axis=0).astype(np.float32)
        return out

    def peak_memory(self, batch: TokenBatch) -> int | None:
        self.forward(batch)
        return 0

    def memory_available(self) -> int:
        return self.free_memory

    def close(self) -> None:
        return None


def fake_backends(*, seed: int = 0) -> BackendFactory:
    """A backend factory that serves every model on a FakeBackend of the model's width and vocabulary
    (its tokenizer and the rest of the app stay real): the full app without loading weights."""

    def make(spec: ModelSpec, settings: Settings) -> FakeBackend:
        config = json.loads((spec.folder / "config.json").read_text(encoding="utf-8"))
        vocab = int(config.get("text_config", config)["vocab_size"])
        return FakeBackend(
            dimensions=spec.dimensions,
            vocab_size=vocab,
            seed=seed,
            workers=settings.model_workers or 1,
            heads=spec.heads is not None,
            splade=spec.splade,
        )

    return make
