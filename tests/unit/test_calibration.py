"""calibration: the key (what the vectors depend on, not which backend computes them), the stored vectors
read back instead of recomputed, a lost race or a damaged file, and each width's ranges finished as
requests are. The fake backend on the bundled model's real tokenizer: no weights are loaded."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embedserve.backends.fake import FakeBackend
from embedserve.calibration import (
    calibration_key,
    calibration_texts,
    embed_texts,
    load_calibration,
    ranges_of,
    served_widths,
)
from embedserve.compact import calibration_ranges
from embedserve.postprocess import finish
from embedserve.spec import ModelSpec
from embedserve.tokenization import TokenizerPool, make_tokenizer_executor, tokenizer_factory
from support import bundled_folder, spec_of


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return replace(spec_of(bundled_folder()), matryoshka_dimensions=(64, 128, 384))


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[TokenizerPool]:
    executor = make_tokenizer_executor(1)
    yield TokenizerPool(tokenizer_factory(bundled_folder()), executor, copies=1)
    executor.shutdown()


def backend(kind: str = "onnx") -> FakeBackend:
    fake = FakeBackend(dimensions=384, vocab_size=30522)
    fake.kind = kind
    return fake


def test_the_calibration_set_is_a_few_hundred_distinct_varied_texts() -> None:
    texts = calibration_texts()
    assert len(texts) == len(set(texts)) == 256
    words = [len(text.split()) for text in texts]
    assert min(words) <= 5 and max(words) >= 100


def test_the_key_is_the_models_not_the_backends(spec: ModelSpec) -> None:
    assert calibration_key(spec, "", "onnx") == calibration_key(spec, "", "torch")
    assert calibration_key(spec, "", "fake") != calibration_key(spec, "", "onnx")
    assert calibration_key(spec, "passage: ", "onnx") != calibration_key(spec, "", "onnx")
    assert calibration_key(replace(spec, pooling="cls"), "", "onnx") != calibration_key(spec, "", "onnx")
    # Widths are derived from the stored vectors: a Matryoshka entry shares the plain one's file.
    assert calibration_key(replace(spec, matryoshka_dimensions=()), "", "onnx") == calibration_key(
        spec, "", "onnx"
    )


def test_each_width_is_ranged_over_the_vectors_truncated_then_normalized(spec: ModelSpec) -> None:
    pooled = np.random.default_rng(0).standard_normal((40, 384)).astype(np.float32)
    ranges = ranges_of(pooled, spec)
    assert sorted(ranges) == list(served_widths(spec)) == [64, 128, 384]
    for width, got in ranges.items():
        finished = finish(pooled, dimensions=None if width == 384 else width, normalize=True)
        assert np.array_equal(got, calibration_ranges(finished))
        assert got.shape == (2, width)


def test_the_vectors_are_embedded_once_then_read_back(
    spec: ModelSpec, tokenizer: TokenizerPool, tmp_path: Path
) -> None:
    first_backend = backend()
    first = load_calibration(spec, tokenizer, first_backend, prefix="", eos_id=None, cache_dir=tmp_path)
    assert sum(rows for rows, _ in first_backend.batches) == 256
    assert max(length for _, length in first_backend.batches) <= 128
    (stored,) = tmp_path.glob("*.npy")
    assert stored.stem == first.key
    # Another backend of the model (other numerics) reads the file: the same ranges, bit for bit.
    other = FakeBackend(dimensions=384, vocab_size=30522, seed=1)
    other.kind = "torch"
    second = load_calibration(spec, tokenizer, other, prefix="", eos_id=None, cache_dir=tmp_path)
    assert other.batches == []
    assert second.digest == first.digest
    assert all(np.array_equal(second.ranges[w], first.ranges[w]) for w in served_widths(spec))


def test_a_file_stored_first_by_another_process_wins(
    spec: ModelSpec, tokenizer: TokenizerPool, tmp_path: Path
) -> None:
    key = calibration_key(spec, "", "onnx")
    theirs = np.full((3, 384), 0.5, dtype=np.float32)
    theirs[0] = -0.5
    tmp_path.mkdir(exist_ok=True)
    np.save(tmp_path / f"{key}.npy", theirs)
    got = load_calibration(spec, tokenizer, backend(), prefix="", eos_id=None, cache_dir=tmp_path)
    assert np.array_equal(
        got.ranges[384], calibration_ranges(finish(theirs, dimensions=None, normalize=True))
    )
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.npy"]  # no temporary file left


@pytest.mark.parametrize("damage", ["not numpy", "cut short", "another width"])
def test_a_damaged_or_misshapen_file_is_computed_again_and_replaced(
    spec: ModelSpec, tokenizer: TokenizerPool, tmp_path: Path, damage: str
) -> None:
    path = tmp_path / f"{calibration_key(spec, '', 'onnx')}.npy"
    np.save(path, np.zeros((4, 16 if damage == "another width" else 384), dtype=np.float32))
    if damage == "cut short":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "not numpy":
        path.write_bytes(b"not a numpy file")
    fake = backend()
    got = load_calibration(spec, tokenizer, fake, prefix="", eos_id=None, cache_dir=tmp_path)
    pooled = embed_texts(calibration_texts(), tokenizer, backend(), spec, prefix="", eos_id=None)
    assert np.array_equal(np.load(path), pooled)
    assert np.array_equal(got.ranges[384], ranges_of(pooled, spec)[384])


def test_an_input_is_cut_as_truncate_cuts_it_keeping_the_eos_a_model_pools_on(
    spec: ModelSpec, tokenizer: TokenizerPool
) -> None:
    texts = calibration_texts()
    longest = max(texts, key=len)
    fake = backend()
    pooled = embed_texts([longest, "short"], tokenizer, fake, spec, prefix="query: ", eos_id=7)
    ids = tokenizer.encode_sync([longest], "query: ")[0]
    assert len(ids) > 128
    assert np.allclose(pooled[0], fake.reference([*ids[:127], 7]), atol=1e-6)
    assert np.allclose(
        pooled[1], fake.reference([*tokenizer.encode_sync(["short"], "query: ")[0], 7]), atol=1e-6
    )


def test_a_data_dir_it_cannot_write_to_costs_the_file_not_the_model(
    spec: ModelSpec, tokenizer: TokenizerPool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    got = load_calibration(
        spec, tokenizer, backend(), prefix="", eos_id=None, cache_dir=blocked / "calibration"
    )
    pooled = embed_texts(calibration_texts(), tokenizer, backend(), spec, prefix="", eos_id=None)
    assert np.array_equal(got.ranges[384], ranges_of(pooled, spec)[384])
    assert "cannot keep the int8 calibration" in caplog.text
