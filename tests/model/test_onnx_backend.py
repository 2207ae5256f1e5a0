"""The ONNX Runtime backend computes what the torch backend computes (same graph, exported once and
cached by the weights' hash), on every pooling kind, padding side and Dense head; int8 stays close."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import FamilyModels
from embedserve.backends import fusion as fusion_module
from embedserve.backends import onnx as onnx_module
from embedserve.backends.onnx import OnnxBackend, graph_key
from embedserve.backends.threads import threads_per_worker, usable_cores
from embedserve.backends.torch import TorchBackend
from embedserve.errors import ModelLoadError
from embedserve.postprocess import min_cosine
from support import MIXED_TEXTS as TEXTS
from support import batch_for, bundled_folder, spec_of


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.mark.parametrize("model", ["minilm", "tiny-cls-dense", "bge-m3", "qwen3"])
def test_onnx_matches_torch_on_a_mixed_length_batch(
    model: str, family_models: FamilyModels, tiny_dense_model: Path, cache: Path
) -> None:
    folder = {
        "minilm": bundled_folder(),
        "tiny-cls-dense": tiny_dense_model,
        "bge-m3": family_models.bge_m3,
        "qwen3": family_models.qwen3,
    }[model]
    spec = spec_of(folder)
    batch = batch_for(spec, TEXTS)
    torch_out = TorchBackend(spec, device="cpu", dtype="float32").forward(batch)
    onnx_backend = OnnxBackend(spec, cache_dir=cache)
    onnx_out = onnx_backend.forward(batch)
    assert onnx_out.shape == torch_out.shape == (len(TEXTS), spec.dimensions)
    assert onnx_out.dtype == np.float32
    assert min_cosine(onnx_out, torch_out) >= 0.9999
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-3)
    assert onnx_backend.description == "onnx cpu float32"
    assert onnx_backend.path.parent.parent == cache


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_concurrent_forward_passes_on_one_session_each_get_their_own_vectors(
    workers: int, cache: Path
) -> None:
    """`workers` passes at once on the one session (as the batcher's threads run them), each on
    cores // workers intra-op threads; every pass gives exactly what a lone pass gives."""
    spec = spec_of(bundled_folder())
    backend = OnnxBackend(spec, cache_dir=cache, workers=workers)
    assert (backend.workers, backend.threads) == (workers, threads_per_worker(usable_cores(), workers))
    batches = [batch_for(spec, TEXTS[i:] + TEXTS[:i]) for i in range(2 * workers)]
    alone = [backend.forward(batch) for batch in batches]
    together: list[np.ndarray | None] = [None] * len(batches)
    barrier = threading.Barrier(len(batches), timeout=60)

    def run(i: int) -> None:
        barrier.wait()
        together[i] = backend.forward(batches[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for expected, got in zip(alone, together, strict=True):
        assert got is not None
        np.testing.assert_allclose(got, expected, atol=1e-5)


FUSED_OPS = {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"}


@pytest.mark.parametrize(
    ("model", "fused"),
    [
        ("minilm", FUSED_OPS),
        ("bge-m3", FUSED_OPS - {"EmbedLayerNormalization"}),  # RoBERTa's padding-offset positions: unfused
        ("qwen3", set()),  # a decoder: the dynamo graph, unfused
    ],
)
def test_encoders_are_served_fused_and_decoders_as_traced(
    model: str, fused: set[str], family_models: FamilyModels, cache: Path
) -> None:
    folder = {"minilm": bundled_folder(), "bge-m3": family_models.bge_m3, "qwen3": family_models.qwen3}[model]
    path = OnnxBackend(spec_of(folder), cache_dir=cache).path
    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    assert ops & FUSED_OPS == fused
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        ("fusion raises", "pattern mismatch"),
        ("fused graph disagrees", "disagrees with its source (pooled min cosine 0.5"),
        ("too little memory", "fusion needs ~0.7 GiB of memory and 0.0 GiB is available"),
    ],
)
def test_a_fusion_that_fails_or_disagrees_is_never_served(
    failure: str,
    reason: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if failure == "fusion raises":

        def broken(*_: object) -> dict[str, int]:
            raise RuntimeError("pattern mismatch")

        monkeypatch.setattr(onnx_module, "fuse", broken)
    elif failure == "fused graph disagrees":
        monkeypatch.setattr(fusion_module, "min_cosine", lambda *_: 0.5)
    else:  # 8 x the 90 MB graph does not fit in 1 MB
        monkeypatch.setattr(fusion_module, "available_memory", lambda: 2**20)
    spec = spec_of(bundled_folder())
    with caplog.at_level(logging.WARNING, logger="embedserve.backends.onnx"):
        backend = OnnxBackend(spec, cache_dir=tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert any("operator fusion skipped" in m and reason in m for m in messages)
    ops = {node.op_type for node in onnx.load(str(backend.path), load_external_data=False).graph.node}
    assert not ops & FUSED_OPS
    assert sorted(p.name for p in backend.path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert [p.name for p in tmp_path.iterdir()] == [backend.path.parent.name]  # no work files left
    batch = batch_for(spec, TEXTS)
    torch_out = TorchBackend(spec, device="cpu", dtype="float32").forward(batch)
    assert min_cosine(backend.forward(batch), torch_out) >= 0.9999


def test_the_graph_is_exported_once_and_reused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_of(bundled_folder())
    first = OnnxBackend(spec, cache_dir=cache).path

    def no_export(*_: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_module, "_export", no_export)
    assert OnnxBackend(spec, cache_dir=cache).path == first
    # Another id with the same weights and pooling shares the graph.
    assert OnnxBackend(spec_of(bundled_folder(), id="again"), cache_dir=cache).path == first


def test_the_key_follows_weights_pooling_and_quantization(tiny_dense_model: Path) -> None:
    minilm = spec_of(bundled_folder())
    assert graph_key(minilm, "none") == graph_key(spec_of(bundled_folder(), id="x"), "none")
    assert graph_key(minilm, "none") != graph_key(minilm, "int8")
    assert graph_key(minilm, "none") != graph_key(spec_of(bundled_folder(), pooling="cls"), "none")
    assert graph_key(minilm, "none") != graph_key(spec_of(tiny_dense_model), "none")


def test_failed_export_leaves_nothing_behind_and_says_why(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_module, "_export", broken)
    empty = tmp_path / "cache"
    spec = spec_of(bundled_folder())
    with pytest.raises(ModelLoadError, match=f"'{spec.id}': ONNX export failed: unsupported operator"):
        OnnxBackend(spec, cache_dir=empty)
    assert list(empty.iterdir()) == []


def test_a_corrupt_cached_graph_is_a_clear_load_error(tmp_path: Path) -> None:
    spec = spec_of(bundled_folder())
    target = tmp_path / graph_key(spec, "none") / "model.onnx"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match="cannot load the ONNX graph"):
        OnnxBackend(spec, cache_dir=tmp_path)


def test_int8_is_a_separate_smaller_graph_and_says_so(cache: Path) -> None:
    """(Its fidelity on every family: tests/model/test_int8.py.)"""
    spec = spec_of(bundled_folder())
    fp32 = OnnxBackend(spec, cache_dir=cache)
    int8 = OnnxBackend(spec, cache_dir=cache, quantize="int8")
    assert int8.description == "onnx cpu int8" and int8.path != fp32.path

    def size(path: Path) -> int:
        data = path.with_suffix(".onnx.data")
        return path.stat().st_size + (data.stat().st_size if data.exists() else 0)

    assert size(int8.path) < 0.85 * size(fp32.path)  # the embedding table (half the file) stays float32
    assert sorted(p.name for p in int8.path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
