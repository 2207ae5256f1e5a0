"""The memory model fitted at load bounds what a forward pass really takes: admission and packing
rely on it, and it is measured only on passes up to 512 tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import FamilyModels
from embedserve.backends.onnx import OnnxBackend
from embedserve.backends.torch import TorchBackend
from embedserve.runtime import calibrate
from embedserve.scheduler.packing import collate
from support import spec_of


@pytest.mark.parametrize("name", ["qwen3", "bge_m3"])
@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_the_memory_model_bounds_what_longer_passes_take(family_models: FamilyModels, name: str,
                                                         kind: str) -> None:
    spec = spec_of(getattr(family_models, name))
    backend = (OnnxBackend(spec, cache_dir=Path(os.environ["EMBEDSERVE_DATA_DIR"]) / "onnx")
               if kind == "onnx" else TorchBackend(spec, device="cpu", dtype="float32"))
    try:
        model, tokens_per_s = calibrate(backend, spec, [40, 41, 42], 0)
        assert tokens_per_s > 0
        for rows, length in ((1, 2048), (2, 2048), (1, 4096)):
            measured = backend.peak_memory(collate([[40] * length] * rows, 0, spec.padding_side))
            assert measured is not None
            assert measured <= model.peak(rows, length), (rows, length, measured, model)
    finally:
        backend.close()
