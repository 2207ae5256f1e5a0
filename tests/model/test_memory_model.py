"""The memory model fitted at load bounds what a forward pass really takes: admission and packing
rely on it, and it is measured only on passes up to 512 tokens. Each backend is measured in a process
of its own, as a server is (a test process full of other fixtures' threads and heap would blur a
process-wide peak)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FamilyModels

MEASURE = """
import json, sys
from pathlib import Path
from embedserve.backends.onnx import OnnxBackend
from embedserve.backends.torch import TorchBackend
from embedserve.runtime import calibrate
from embedserve.backends.batch import collate
sys.path.insert(0, "tests")
from support import spec_of
folder, kind, cache = sys.argv[1:4]
spec = spec_of(Path(folder))
backend = (OnnxBackend(spec, cache_dir=Path(cache)) if kind == "onnx"
           else TorchBackend(spec, device="cpu", dtype="float32"))
model, rate = calibrate(backend, spec, [40, 41, 42], 0)
shapes = [(1, 2048), (2, 2048), (1, 4096)]
measured = [backend.peak_memory(collate([[40] * t] * b, 0, spec.padding_side)) for b, t in shapes]
print(json.dumps({"rate": rate, "estimated": [model.peak(b, t) for b, t in shapes],
                  "measured": measured}))
"""


@pytest.mark.parametrize("name", ["qwen3", "bge_m3"])
@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_the_memory_model_bounds_what_longer_passes_take(
    family_models: FamilyModels, name: str, kind: str
) -> None:
    cache = Path(os.environ["EMBEDSERVE_DATA_DIR"]) / "onnx"
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(getattr(family_models, name)), kind, str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rate"] > 0
    for measured, estimated in zip(result["measured"], result["estimated"], strict=True):
        assert measured is not None
        assert measured <= estimated, result
