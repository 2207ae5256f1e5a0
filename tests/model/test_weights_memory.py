"""Loading a model holds one copy of its weights: transformers maps the safetensors file and the backend
neither copies the state dict nor keeps a second model around. Measured as the peak resident memory of
a fresh process, so that nothing else in the test session counts."""

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
import torch
import transformers.models.xlm_roberta.modeling_xlm_roberta  # imports are not the model's memory
from transformers import AutoModel
from embedserve.backends.torch import TorchBackend
from embedserve.catalog import ModelEntry, read_spec
from embedserve.types import TokenBatch

folder = Path(sys.argv[1])
spec = read_spec(ModelEntry(source=str(folder), id="wide", pooling="cls", normalize=True), folder)
before = status("VmRSS")
backend = TorchBackend(spec, device="cpu", dtype="float32")
ids = np.array([[0, 5, 6, 2]], dtype=np.int64)
backend.forward(TokenBatch(input_ids=ids, attention_mask=np.ones_like(ids), real_tokens=4))
touched = sum(float(p.sum()) for p in backend._model.parameters())  # every page in memory
print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS")}))
"""


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An XLM-RoBERTa whose weights (~130 MB, mostly the embedding table) dwarf the noise of a process."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder = tmp_path_factory.mktemp("wide") / "wide-xlmr"
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=30_000, hidden_size=1024, num_hidden_layers=1,
                              num_attention_heads=4, intermediate_size=64, max_position_embeddings=514)
    XLMRobertaModel(config).save_pretrained(folder)
    return folder


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_loading_holds_a_single_copy_of_the_weights(wide_model: Path) -> None:
    size = (wide_model / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", PROBE, str(wide_model)], capture_output=True, text=True,
                         timeout=300, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    grown = mem["peak"] - mem["before"]
    # One copy is `size`; a second copy (state dict beside the model, or CPU model beside a moved one)
    # would be >= 2 * size. Allow 40% for activations, allocator slack and the probe's own work.
    assert size <= grown < 1.4 * size, (size, mem)
