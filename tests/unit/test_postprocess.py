"""embedserve.postprocess: truncate to `dimensions`, then normalize, then encode for the wire."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from embedserve.postprocess import encode_vectors, finish, l2_normalize, min_cosine, to_base64, truncate_dims


def vectors(rows: int = 3, dims: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dims)).astype(np.float32) * 3.0


def decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


@pytest.mark.parametrize(("dimensions", "width"), [(None, 8), (4, 4), (1, 1), (8, 8), (100, 8)])
def test_truncate_dims_keeps_the_leading_dimensions(dimensions: int | None, width: int) -> None:
    v = vectors()
    out = truncate_dims(v, dimensions)
    assert out.shape == (3, width)
    np.testing.assert_array_equal(out, v[:, :width])


def test_l2_normalize_gives_unit_rows_and_keeps_direction() -> None:
    v = vectors()
    out = l2_normalize(v)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out * np.linalg.norm(v, axis=1, keepdims=True), v, rtol=1e-5, atol=1e-5)


def test_l2_normalize_leaves_a_zero_row_finite() -> None:
    out = l2_normalize(np.zeros((1, 4), dtype=np.float32))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dimensions", [1, 3, 5])
def test_truncation_then_normalization_gives_unit_vectors(dimensions: int, normalize: bool) -> None:
    out = finish(vectors(), dimensions=dimensions, normalize=normalize)
    assert out.shape == (3, dimensions)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_finish_normalizes_the_truncated_prefix_not_the_full_vector() -> None:
    v = vectors()
    out = finish(v, dimensions=4, normalize=True)
    prefix = v[:, :4]
    expected = prefix / np.linalg.norm(prefix, axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    wrong_order = (v / np.linalg.norm(v, axis=1, keepdims=True))[:, :4]
    assert not np.allclose(out, wrong_order, atol=1e-3)


def test_finish_without_normalize_or_dimensions_returns_the_values_unchanged() -> None:
    v = vectors()
    out = finish(v, dimensions=None, normalize=False)
    np.testing.assert_array_equal(out, v)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous


def test_finish_with_normalize_and_no_dimensions_normalizes_every_dimension() -> None:
    v = vectors()
    out = finish(v, dimensions=None, normalize=True)
    np.testing.assert_allclose(out, v / np.linalg.norm(v, axis=1, keepdims=True), rtol=1e-6, atol=1e-6)


def test_finish_casts_float64_input_to_float32() -> None:
    out = finish(vectors().astype(np.float64), dimensions=None, normalize=False)
    assert out.dtype == np.float32


def test_to_base64_round_trips_little_endian_float32() -> None:
    row = vectors(rows=1, dims=16)[0]
    np.testing.assert_array_equal(decode(to_base64(row)), row)


def test_to_base64_of_a_big_endian_or_float64_row_decodes_to_the_same_values() -> None:
    row = np.array([1.5, -2.25, 3.0e-3, 0.0], dtype=np.float32)
    for variant in (row.astype(">f4"), row.astype(np.float64)):
        np.testing.assert_array_equal(decode(to_base64(variant)), row)


def test_to_base64_of_a_non_contiguous_row_encodes_its_values() -> None:
    v = vectors(rows=2, dims=8)
    column_view = v[:, ::2][0]
    assert not column_view.flags.c_contiguous
    np.testing.assert_array_equal(decode(to_base64(column_view)), v[0, ::2])


def test_encode_vectors_as_float_gives_one_float32_row_per_vector() -> None:
    v = vectors()
    rows = encode_vectors(v, "float")
    assert len(rows) == 3
    for row, expected in zip(rows, v, strict=True):
        assert isinstance(row, np.ndarray)
        assert row.dtype == np.float32
        np.testing.assert_array_equal(row, expected)


def test_encode_vectors_as_base64_gives_one_decodable_string_per_vector() -> None:
    v = finish(vectors(), dimensions=5, normalize=True)
    rows = encode_vectors(v, "base64")
    assert len(rows) == 3
    for row, expected in zip(rows, v, strict=True):
        assert isinstance(row, str)
        np.testing.assert_array_equal(decode(row), expected)


def test_min_cosine_is_the_worst_row() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    assert min_cosine(a, a * 7) == pytest.approx(1.0)
    b = a.copy()
    b[1] = [2.0, 0.0]  # one row turned a right angle
    assert min_cosine(a, b) == pytest.approx(0.0, abs=1e-12)
    assert min_cosine(a, -a) == pytest.approx(-1.0)
    zero = np.zeros_like(a)
    assert min_cosine(a, zero) == pytest.approx(0.0)  # a zero row agrees with nothing
