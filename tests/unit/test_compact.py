"""compact.quantize against sentence-transformers' quantize_embeddings, bit for bit, on random data: every
dtype, widths that are not a multiple of 8, values outside the ranges, a constant dimension."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from embedserve.compact import calibration_ranges, quantize
from embedserve.postprocess import l2_normalize
from embedserve.types import OutputDtype

DTYPES: tuple[OutputDtype, ...] = ("int8", "uint8", "binary", "ubinary")


@pytest.mark.parametrize("width", [1, 7, 8, 9, 64, 100, 383, 1024])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_equals_quantize_embeddings(dtype: OutputDtype, width: int) -> None:
    rng = np.random.default_rng(width)
    calibration = l2_normalize(rng.standard_normal((200, width)).astype(np.float32))
    # Vectors from outside the calibration set: some values fall outside its ranges, and are clipped.
    vectors = l2_normalize(rng.standard_normal((50, width)).astype(np.float32))
    ranges = calibration_ranges(calibration)
    got = quantize(vectors, dtype, ranges)
    expected = quantize_embeddings(vectors, precision=dtype, ranges=ranges)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape == (50, width if dtype.endswith("int8") else -(-width // 8))
    assert got.tobytes() == expected.tobytes()


def test_calibration_ranges_are_the_minimum_and_maximum_of_each_dimension() -> None:
    vectors = np.asarray([[0.5, -1.0, 2.0], [-0.25, 3.0, 2.0]], dtype=np.float32)
    assert calibration_ranges(vectors).tolist() == [[-0.25, -1.0, 2.0], [0.5, 3.0, 2.0]]
    assert calibration_ranges(vectors).dtype == np.float32


def test_values_outside_the_ranges_take_the_end_levels() -> None:
    ranges = np.asarray([[-1.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    vectors = np.asarray([[-5.0, 2.0], [1.5, 0.0], [0.0, 0.5]], dtype=np.float32)
    assert quantize(vectors, "uint8", ranges).tolist() == [[0, 255], [255, 0], [127, 127]]
    assert quantize(vectors, "int8", ranges).tolist() == [[-128, 127], [127, -128], [-1, -1]]


def test_a_constant_dimension_counts_whole_units_from_its_value() -> None:
    """Step 0 is read as a step of 1 (quantize_embeddings' rule), so the dimension is not divided by 0."""
    ranges = np.asarray([[0.25, -1.0], [0.25, 1.0]], dtype=np.float32)
    vectors = np.asarray([[0.25, 0.0], [0.75, 0.0], [2.5, 0.0]], dtype=np.float32)
    got = quantize(vectors, "uint8", ranges)
    assert got[:, 0].tolist() == [0, 0, 2]
    assert got.tobytes() == quantize_embeddings(vectors, precision="uint8", ranges=ranges).tobytes()


def test_binary_packs_signs_eight_a_byte_first_dimension_in_the_top_bit() -> None:
    vectors = np.asarray([[1, -1, -1, -1, -1, -1, -1, 0.5, 0, 3]], dtype=np.float32)
    assert quantize(vectors, "ubinary").tolist() == [[0b10000001, 0b01000000]]
    assert quantize(vectors, "binary").tolist() == [[0b10000001 - 128, 0b01000000 - 128]]
