"""Pure finishing of a pass's outputs: pooled vectors truncated to the requested Matryoshka `dimensions`
first, then L2-normalized, then encoded for the wire (float32 arrays or base64 of little-endian
float32); bge-m3's token weights folded into lexical weights by token id, a SPLADE row's vocabulary
weights kept where nonzero, and ColBERT token vectors normalized (FlagEmbedding's BGEM3FlagModel and
sentence-transformers' SparseEncoder are the references)."""

from __future__ import annotations

import base64
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from embedserve.types import ByteMatrix, EncodingFormat, FloatMatrix, SparseVector

_EPS = 1e-12


def truncate_dims(vectors: FloatMatrix, dimensions: int | None) -> FloatMatrix:
    """[N, D] -> [N, dimensions]; None keeps every dimension."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    return vectors[:, :dimensions]


def l2_normalize(vectors: FloatMatrix) -> FloatMatrix:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # [N, 1]
    out: FloatMatrix = (vectors / np.maximum(norms, _EPS)).astype(np.float32, copy=False)
    return out


def min_cosine(a: FloatMatrix, b: FloatMatrix) -> float:
    """The smallest cosine between matching rows of two [N, D] matrices (normalized or not; a zero row
    agrees with nothing): how fidelity is scored, from the fusion check to the tests."""
    return float((l2_normalize(a) * l2_normalize(b)).sum(axis=1).min())


def finish(vectors: FloatMatrix, *, dimensions: int | None, normalize: bool) -> FloatMatrix:
    """The order matters: a truncated Matryoshka vector is re-normalized over what is kept."""
    out = truncate_dims(vectors.astype(np.float32, copy=False), dimensions)
    if normalize or dimensions is not None:
        out = l2_normalize(out)
    return np.ascontiguousarray(out, dtype=np.float32)


def to_base64(vector: npt.NDArray[Any]) -> str:
    """One vector as base64 of its little-endian bytes (float32: what the OpenAI SDK decodes; int8 and
    uint8 as they are)."""
    dtype = vector.dtype if vector.dtype in (np.int8, np.uint8) else np.dtype("<f4")
    return base64.b64encode(np.ascontiguousarray(vector, dtype=dtype).tobytes()).decode("ascii")


def encode_vectors(
    vectors: FloatMatrix | ByteMatrix, encoding_format: EncodingFormat
) -> list[npt.NDArray[Any]] | list[str]:
    """Rows ready for the JSON encoder: arrays (orjson writes float32 and int8/uint8 natively) or
    base64."""
    if encoding_format == "base64":
        return [to_base64(row) for row in vectors]
    return list(vectors)


def encode_colbert(vectors: FloatMatrix, encoding_format: EncodingFormat) -> FloatMatrix | dict[str, Any]:
    """One input's [n, C] ColBERT vectors for the JSON encoder: the matrix (a list of vectors), or one
    base64 buffer of its little-endian float32 values with its shape."""
    if encoding_format == "base64":
        return {"data": to_base64(vectors.reshape(-1)), "shape": list(vectors.shape)}
    return vectors


def lexical_weights(
    ids: Sequence[int], weights: npt.NDArray[np.float32], skip: Collection[int]
) -> SparseVector:
    """bge-m3's sparse vector: [n] token ids and their [n] weights (relu already applied) -> the largest
    weight of each id, ids in `skip` (CLS, EOS, PAD, UNK) and weights <= 0 left out."""
    best: dict[int, float] = {}
    for token, weight in zip(ids, weights.tolist(), strict=True):
        if weight > 0 and token not in skip and weight > best.get(token, 0.0):
            best[token] = weight
    order = sorted(best)
    return SparseVector(
        indices=np.asarray(order, dtype=np.int64),
        values=np.asarray([best[t] for t in order], dtype=np.float32),
    )


def nonzero_weights(vector: npt.NDArray[np.float32]) -> SparseVector:
    """A SPLADE row's [V] vocabulary weights -> the ids with a weight above 0, ascending."""
    (indices,) = np.nonzero(vector > 0)
    return SparseVector(indices=indices.astype(np.int64), values=vector[indices].astype(np.float32))


def colbert_vectors(token_vectors: FloatMatrix) -> FloatMatrix:
    """[n, C] vectors at an input's real tokens -> [n - 1, C]: the first (CLS) left out, each row
    L2-normalized (the final </s> is kept, as FlagEmbedding keeps it)."""
    return np.ascontiguousarray(l2_normalize(token_vectors[1:]), dtype=np.float32)
