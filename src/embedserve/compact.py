"""Compact dense vectors (extension `output_dtype`), pure, with sentence-transformers'
`quantize_embeddings` semantics bit for bit: int8 / uint8 place each dimension in 256 steps of its
calibration range ((max - min) / 255, from the model's fixed calibration text, so that every request,
restart and replica uses the same ranges); binary / ubinary keep the sign, eight dimensions a byte,
the first in the most significant bit (binary as int8, the byte less 128)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from embedserve.types import ByteMatrix, FloatMatrix, OutputDtype

#: [2, D] float32: each dimension's minimum (row 0) and maximum (row 1) over the calibration vectors.
Ranges = npt.NDArray[np.float32]


def calibration_ranges(vectors: FloatMatrix) -> Ranges:
    """[N, D] calibration vectors (as served: truncated, normalized) -> [2, D] ranges."""
    return np.vstack((vectors.min(axis=0), vectors.max(axis=0))).astype(np.float32)


def quantize(vectors: FloatMatrix, dtype: OutputDtype, ranges: Ranges | None = None) -> ByteMatrix:
    """[N, D] float32 -> [N, D] int8/uint8 (with `ranges`) or [N, ceil(D / 8)] packed bits."""
    if dtype in ("int8", "uint8"):
        assert ranges is not None, f"{dtype} needs the model's calibration ranges"
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps).astype(np.float32)  # a constant dimension: one step
        levels = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        if dtype == "uint8":
            return levels.astype(np.uint8)
        return (levels - 128).astype(np.int8)
    bits = np.packbits(vectors > 0, axis=-1)  # [N, ceil(D / 8)] uint8, MSB first
    if dtype == "ubinary":
        return bits
    if dtype == "binary":
        return (bits.astype(np.int16) - 128).astype(np.int8)
    raise AssertionError(f"no compact form for {dtype!r}")
