"""int8 is activation-smoothed dynamic quantization: the smoothing rewrite is exact in float32, the
calibration text is fixed and disjoint from the benchmark corpus, and the int8 graph stays within the
fidelity bar on every family (left padding and last-token pooling included)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import FamilyModels
from embedserve.backends.int8 import (
    CALIBRATION_MODULES,
    activation_ranges,
    calibration_texts,
    int8_nodes,
    smooth,
    smoothing_scales,
)
from embedserve.backends.onnx import OnnxBackend, calibration_feeds
from embedserve.postprocess import min_cosine
from support import MIXED_TEXTS as TEXTS
from support import batch_for, bundled_folder, spec_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("int8-cache")


def test_scales_follow_the_formula_and_stay_bounded() -> None:
    x = np.array([4.0, 0.25, 100.0, 0.0, 1e9])
    w = np.array([1.0, 0.0625, 0.01, 1e6, 1e-9])
    got = smoothing_scales(x, w, alpha=0.5)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:3], [2.0, 2.0, 100.0], rtol=1e-6)
    assert got[3] == pytest.approx(1e-3)  # a channel calibration never saw, on big weights: clipped, not 0
    assert got[4] == pytest.approx(1e3)  # a huge activation on a zero row: clipped, not inf
    np.testing.assert_allclose(smoothing_scales(x[:3], w[:3], alpha=1.0), [4.0, 0.25, 100.0], rtol=1e-6)


def test_calibration_text_is_fixed_real_and_not_the_benchmark_corpus() -> None:
    texts = calibration_texts()
    assert texts == calibration_texts() and len(texts) == 256 and len(set(texts)) == 256
    assert all(3 <= len(t.split()) <= 200 for t in texts)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from corpus import MODULES
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert not set(CALIBRATION_MODULES) & set(MODULES)


@pytest.mark.parametrize("model", ["minilm", "qwen3"])
def test_smoothing_changes_the_graph_but_not_what_it_computes(
    model: str, family_models: FamilyModels, cache: Path, tmp_path: Path
) -> None:
    spec = spec_of({"minilm": bundled_folder(), "qwen3": family_models.qwen3}[model])
    source = OnnxBackend(spec, cache_dir=cache).path
    proto = onnx.load(str(source))
    nodes = int8_nodes(proto)
    readers = sorted({n.input[0] for n in nodes})
    if model == "minilm":
        # Fused: per layer the Attention (QKV in one weight), the attention output and the up-projection,
        # each reading its own tensor; down-projections stay float32.
        assert [n.op_type for n in nodes] == ["Attention", "MatMul", "MatMul"] * 6
        assert len(readers) == 6 * 3
    else:
        # Unfused (decoder): plain MatMuls; those reading one tensor share one smoothing.
        assert {n.op_type for n in nodes} == {"MatMul"}
    ranges = activation_ranges(source, calibration_feeds(spec), readers)
    assert set(ranges) == set(readers)
    if model == "minilm":
        assert max(float(r.max() / np.median(r)) for r in ranges.values()) > 10  # the outliers exist
    smooth(proto, nodes, ranges)
    smoothed = tmp_path / "smoothed.onnx"
    onnx.save(proto, str(smoothed), save_as_external_data=True, location="smoothed.onnx.data")
    batch = batch_for(spec, TEXTS)
    feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    before, after = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["pooled"], feed)[0]
        for p in (source, smoothed)
    )
    muls = [n for n in proto.graph.node if n.op_type == "Mul" and n.name.startswith("embedserve_smooth")]
    assert len(muls) == len(readers)
    np.testing.assert_allclose(after, before, atol=1e-5)


@pytest.mark.parametrize("model", ["minilm", "bge-m3", "qwen3"])
def test_int8_stays_within_the_fidelity_bar_on_every_family(
    model: str, family_models: FamilyModels, cache: Path
) -> None:
    folder = {"minilm": bundled_folder(), "bge-m3": family_models.bge_m3, "qwen3": family_models.qwen3}[model]
    spec = spec_of(folder)
    batch = batch_for(spec, TEXTS)
    int8 = OnnxBackend(spec, cache_dir=cache, quantize="int8")
    assert int8.precision == "int8" and int8.description == "onnx cpu int8"
    ops = {n.op_type for n in onnx.load(str(int8.path), load_external_data=False).graph.node}
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
    assert ("QAttention" in ops) == (model != "qwen3")  # encoders' fused attention is quantized too
    fp32 = OnnxBackend(spec, cache_dir=cache).forward(batch)
    assert min_cosine(int8.forward(batch), fp32) >= 0.99
