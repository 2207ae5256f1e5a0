"""Loading a model holds one copy of its weights: transformers maps the safetensors file and the torch
backend neither copies the state dict nor keeps a second model around; the ONNX backend holds only its
session (the graph's weights, external data ORT maps). Measured as the peak resident memory of a fresh
process, so that nothing else in the test session counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import json, sys
from pathlib import Path

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

import numpy as np
import onnxruntime
import torch
import transformers.models.xlm_roberta.modeling_xlm_roberta  # imports are not the model's memory
from transformers import AutoModel
from embedserve.backends.onnx import OnnxBackend, ensure_graph
from embedserve.backends.torch import TorchBackend
from embedserve.catalog.compose import read_spec
from embedserve.catalog.entries import ModelEntry
from embedserve.types import TokenBatch

folder, kind, cache = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
spec = read_spec(ModelEntry(source=str(folder), id="wide", pooling="cls", normalize=True), folder)
if kind == "export":  # the one-time export runs in a process of its own
    ensure_graph(spec, cache, "none")
    sys.exit(0)
before = status("VmRSS")
if kind == "torch":
    backend = TorchBackend(spec, device="cpu", dtype="float32")
else:
    backend = OnnxBackend(spec, cache_dir=cache)
ids = np.array([[0, 5, 6, 2]], dtype=np.int64)
backend.forward(TokenBatch(input_ids=ids, attention_mask=np.ones_like(ids), real_tokens=4))
if kind == "torch":
    touched = sum(float(p.sum()) for p in backend.graph().parameters())  # every page in memory
print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS")}))
"""


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An XLM-RoBERTa whose weights (~130 MB, mostly the embedding table) dwarf the noise of a process."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder = tmp_path_factory.mktemp("wide") / "wide-xlmr"
    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=30_000,
        hidden_size=1024,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=514,
    )
    XLMRobertaModel(config).save_pretrained(folder)
    return folder


def _probe(*args: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300, check=True
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
    return result


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_torch_loading_holds_a_single_copy_of_the_weights(wide_model: Path, tmp_path: Path) -> None:
    size = (wide_model / "model.safetensors").stat().st_size
    mem = _probe(str(wide_model), "torch", str(tmp_path))
    grown = mem["peak"] - mem["before"]
    # One copy is `size` (every parameter is touched); a second copy (state dict beside the model, or
    # CPU model beside a moved one) would be >= 2 * size. 40% for activations, allocator slack, probe.
    assert size <= grown < 1.4 * size, (size, mem)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_onnx_loading_holds_at_most_one_copy_of_the_weights(wide_model: Path, tmp_path: Path) -> None:
    """ORT maps the external weights and touches only what runs (here a few embedding rows), so the
    bound is one-sided: a session that copied the weights (or kept the export's torch model) would
    grow by `size` or more."""
    size = (wide_model / "model.safetensors").stat().st_size
    _probe(str(wide_model), "export", str(tmp_path))
    mem = _probe(str(wide_model), "onnx", str(tmp_path))
    assert mem["peak"] - mem["before"] < 0.5 * size, (size, mem)
