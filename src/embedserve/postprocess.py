"""Pure finishing of pooled vectors: truncate to the requested Matryoshka `dimensions` first, then
L2-normalize, then encode for the wire (float32 arrays or base64 of little-endian float32)."""

from __future__ import annotations

import base64

import numpy as np

from embedserve.types import EncodingFormat, FloatMatrix

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


def to_base64(vector: FloatMatrix) -> str:
    """One vector as base64 of its little-endian float32 bytes (what the OpenAI SDK decodes)."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def encode_vectors(vectors: FloatMatrix, encoding_format: EncodingFormat) -> list[FloatMatrix] | list[str]:
    """Rows ready for the JSON encoder: float32 arrays (orjson writes them natively) or base64."""
    if encoding_format == "base64":
        return [to_base64(row) for row in vectors]
    return list(vectors)
