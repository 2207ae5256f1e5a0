"""PyTorch backend: the model as transformers builds it (SDPA attention), the mask-driven pooler and the
sentence-transformers Dense head, bge-m3's sparse and ColBERT heads where the folder has them, or a
masked LM's SPLADE pooling, on CPU in float32 or on CUDA in bfloat16/float16."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from embedserve.backends.memory import available, peak_during
from embedserve.backends.pooling import pool
from embedserve.errors import ModelLoadError
from embedserve.spec import DenseLayer, M3Heads, ModelSpec
from embedserve.types import FloatMatrix, PassOutputs, Pooling, TokenBatch

log = logging.getLogger("embedserve.backends.torch")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was requested but no CUDA device is available")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return _DTYPES[requested]


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    safetensors = folder / "model.safetensors"
    if safetensors.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors))
    state: dict[str, torch.Tensor] = torch.load(
        folder / "pytorch_model.bin", map_location="cpu", weights_only=True
    )
    return state


def _dense_module(layer: DenseLayer) -> torch.nn.Sequential:
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    state = _load_state(layer.folder)
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    activation = torch.nn.Tanh() if layer.activation == "tanh" else torch.nn.Identity()
    return torch.nn.Sequential(linear, activation)


def _head(path: Path, in_features: int, out_features: int) -> torch.nn.Linear:
    """A Linear saved as FlagEmbedding saves bge-m3's heads: its state dict alone, in a .pt file."""
    linear = torch.nn.Linear(in_features, out_features)
    try:
        linear.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the head {path}: {exc}") from exc
    return linear


class _EmbeddingGraph(torch.nn.Module):
    """The whole pass, (input_ids, attention_mask) -> pooled [B, D] (SPLADE: [B, V]), or, with bge-m3's
    heads, (pooled, token weights [B, T], token vectors [B, T, C]): the backend runs it, the ONNX
    backend exports it, so both compute the same function."""

    def __init__(
        self, model: torch.nn.Module, dense: torch.nn.Module, pooling: Pooling, heads: M3Heads | None
    ) -> None:
        super().__init__()
        self.model, self.dense, self.pooling = model, dense, pooling
        self.sparse_linear: torch.nn.Module | None = None
        self.colbert_linear: torch.nn.Module | None = None
        if heads is not None:
            self.sparse_linear = _head(heads.sparse_linear, heads.hidden_size, 1)
            self.colbert_linear = _head(heads.colbert_linear, heads.hidden_size, heads.colbert_dim)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == "splade":
            pooled: torch.Tensor = pool("splade", out.logits, attention_mask)  # [B, V]
            return pooled
        hidden = out.last_hidden_state  # [B, T, H]
        pooled = self.dense(pool(self.pooling, hidden, attention_mask))  # [B, D]
        if self.sparse_linear is None or self.colbert_linear is None:
            return pooled
        weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)  # [B, T]
        vectors = self.colbert_linear(hidden)  # [B, T, C]
        return pooled, weights, vectors


def _numpy(tensor: torch.Tensor) -> FloatMatrix:
    out: FloatMatrix = tensor.float().cpu().numpy().astype(np.float32, copy=False)
    return out


class TorchBackend:
    def __init__(
        self, spec: ModelSpec, *, device: str, dtype: str, attention: str = "sdpa", cores: int | None = None
    ) -> None:
        """`attention`: transformers' implementation; "eager" only to export it for fusion (onnx.py).
        `cores`: torch's CPU threads (process-wide), e.g. a Ray actor's share; unset: torch's default."""
        if cores is not None:
            torch.set_num_threads(cores)
        from transformers import AutoModel, AutoModelForMaskedLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # noise in a server log

        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        try:
            loader = AutoModelForMaskedLM if spec.splade else AutoModel
            model = loader.from_pretrained(str(spec.folder), dtype=self._dtype, attn_implementation=attention)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model '{spec.id}': cannot load weights from {spec.folder}: {exc}") from exc
        model = model.to(self._device).eval()
        dense = torch.nn.Sequential(*(_dense_module(d) for d in spec.dense))
        graph = _EmbeddingGraph(model, dense, spec.pooling, spec.heads)
        self._graph = graph.to(self._device, self._dtype).eval()
        self.heads = spec.heads is not None
        self.dimensions = spec.dimensions
        self.kind, self.device = "torch", self._device.type
        self.precision = str(self._dtype).removeprefix("torch.")
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.description = f"torch {self.device} {self.precision}"
        # One pass at a time: torch's CPU threads are process-wide and a CUDA stream is one queue.
        self.workers = 1
        self.threads = torch.get_num_threads() if self.device == "cpu" else 1
        # SDPA's memory-efficient kernels hold less than one score matrix: one is an upper bound.
        self.attention_copies = 1

    def graph(self) -> torch.nn.Module:
        """The module that `forward` runs, (input_ids, attention_mask) -> pooled (what onnx.py exports)."""
        return self._graph

    def forward(self, batch: TokenBatch) -> FloatMatrix:
        return self.encode(batch, tokens=False).dense

    @torch.inference_mode()
    def encode(self, batch: TokenBatch, *, tokens: bool) -> PassOutputs:
        input_ids = torch.from_numpy(batch.input_ids).to(self._device)  # [B, T]
        mask = torch.from_numpy(batch.attention_mask).to(self._device)  # [B, T]
        out = self._graph(input_ids, mask)
        if isinstance(out, torch.Tensor):
            return PassOutputs(dense=_numpy(out))
        pooled, weights, vectors = out  # [B, D], [B, T], [B, T, C]
        if not tokens:
            return PassOutputs(dense=_numpy(pooled))
        return PassOutputs(dense=_numpy(pooled), token_weights=_numpy(weights), token_vectors=_numpy(vectors))

    def peak_memory(self, batch: TokenBatch) -> int | None:
        # The pass at its largest: with the token outputs, where the model has them (runtime.calibrate).
        if self._device.type != "cuda":
            return peak_during(lambda: self.encode(batch, tokens=True))
        torch.cuda.synchronize(self._device)
        before = torch.cuda.memory_allocated(self._device)
        torch.cuda.reset_peak_memory_stats(self._device)
        self.encode(batch, tokens=True)
        return max(0, int(torch.cuda.max_memory_allocated(self._device)) - before)

    def memory_available(self) -> int:
        if self._device.type != "cuda":
            return available()
        free, _total = torch.cuda.mem_get_info(self._device)
        return int(free)

    def close(self) -> None:
        del self._graph
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
