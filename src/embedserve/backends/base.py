"""The Backend protocol: one forward pass over a padded TokenBatch, returning one pooled float32 vector
per row (after any Dense head, before normalization) and, for a model with bge-m3's heads, each
token's lexical weight and ColBERT vector from the same pass. Implementations run on the model's
batcher threads (up to `workers` calls at once), never on the event loop."""

from __future__ import annotations

from typing import Protocol

from embedserve.types import FloatMatrix, PassOutputs, TokenBatch


class Backend(Protocol):
    #: Width of the vectors `forward` returns.
    dimensions: int
    #: Rows of the input-embedding table: token ids at or above it cannot be embedded.
    vocab_size: int
    #: Which engine runs the graph ("onnx", "torch").
    kind: str
    #: Where the forward pass runs ("cpu" or "cuda"): the batcher packs tighter on CPU.
    device: str
    #: The arithmetic of the weights ("float32", "bfloat16", "int8", ...).
    precision: str
    #: What serves, for the model listing and the start-up log (e.g. "torch cpu float32").
    description: str
    #: Forward passes that may run at once: the batcher runs one thread per worker (onnx on CPU: several
    #: passes share one session; torch: 1).
    workers: int
    #: Threads one forward pass uses on CPU (the batcher sizes CPU batches by it).
    threads: int
    #: Float32 [heads, T, T] attention-score matrices a pass holds at once per row, at its peak: what
    #: its memory grows with on long inputs (runtime.shape_floor).
    attention_copies: int

    def forward(self, batch: TokenBatch) -> FloatMatrix:
        """[B, T] ids and mask -> [B, D] float32 pooled vectors."""
        ...

    def encode(self, batch: TokenBatch, *, tokens: bool) -> PassOutputs:
        """The pass as the batcher runs it: the pooled vectors and, with `tokens` on a model with the
        heads, the per-token outputs ([B, T] weights, [B, T, C] vectors) of the same pass."""
        ...

    def peak_memory(self, batch: TokenBatch) -> int | None:
        """Run `batch` once and return the bytes its pass held at the peak, above the level before it
        (None where the device cannot tell): what the memory model is fitted to at load."""
        ...

    def memory_available(self) -> int:
        """Bytes still free where the passes run (the host's memory, or the GPU's)."""
        ...

    def close(self) -> None: ...
