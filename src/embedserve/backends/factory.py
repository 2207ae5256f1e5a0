"""Which backend serves a model, and building it: the one place a backend is added. The engine takes a
factory (`BackendFactory`), so the whole app runs on another one (the fake backend in tests)."""

from __future__ import annotations

from typing import Literal, Protocol

from embedserve.backends.base import Backend
from embedserve.backends.threads import default_workers, usable_cores
from embedserve.errors import ModelLoadError
from embedserve.settings import Settings
from embedserve.spec import ModelSpec
from embedserve.types import BackendName, DeviceName, DtypeName, Quantize


class BackendFactory(Protocol):
    def __call__(self, spec: ModelSpec, settings: Settings) -> Backend:
        """Blocking: the backend of `spec`, its weights loaded (not yet warmed up)."""
        ...


def choose_backend(
    backend: BackendName, *, device: DeviceName, dtype: DtypeName, quantize: Quantize, cuda: bool
) -> Literal["torch", "onnx"]:
    """Pure. `auto`: ONNX Runtime on CPU in float32 or int8 (the fastest there), torch on CUDA or for
    bf16/fp16 on CPU. An explicit choice that cannot serve the request is an error, never a fallback."""
    on_cuda = device == "cuda" or (device == "auto" and cuda)
    if quantize == "int8" and (backend == "torch" or on_cuda or dtype not in ("auto", "float32")):
        raise ModelLoadError(
            "--quantize int8 runs on the onnx backend on CPU (float32 weights in, int8 "
            "matrix products out); drop --backend torch / --device cuda / --dtype"
        )
    if backend == "onnx" and (on_cuda or dtype not in ("auto", "float32")):
        raise ModelLoadError(
            "--backend onnx runs on CPU in float32 (or int8 with --quantize int8); "
            "use --backend torch for CUDA or bf16/fp16"
        )
    if backend != "auto":
        return backend
    return "torch" if on_cuda or dtype not in ("auto", "float32") else "onnx"


def cuda_available() -> bool:
    import torch  # only asked when the device is `auto`: the package imports without torch

    return bool(torch.cuda.is_available())


def make_backend(spec: ModelSpec, settings: Settings) -> Backend:
    """The real backends: ONNX Runtime or torch, as `choose_backend` decides from the model's entry
    over the server's settings."""
    device = spec.device if spec.device != "auto" else settings.device
    dtype = spec.dtype if spec.dtype != "auto" else settings.dtype
    quantize = spec.quantize or settings.quantize
    requested = spec.backend if spec.backend != "auto" else settings.backend
    cuda = device == "auto" and cuda_available()
    chosen = choose_backend(requested, device=device, dtype=dtype, quantize=quantize, cuda=cuda)
    if chosen == "onnx":
        from embedserve.backends.onnx import OnnxBackend  # onnxruntime is imported only when needed

        cores = settings.cpu_cores or usable_cores()
        workers = settings.model_workers or default_workers(cores)
        return OnnxBackend(
            spec, cache_dir=settings.data_dir / "onnx", quantize=quantize, workers=workers, cores=cores
        )
    if settings.model_workers not in (None, 1):
        raise ModelLoadError(
            f"model '{spec.id}': --model-workers applies to the onnx backend; torch "
            "runs one forward pass at a time (its CPU threads are process-wide)"
        )
    from embedserve.backends.torch import TorchBackend  # torch is imported only when needed

    return TorchBackend(spec, device=device, dtype=dtype, cores=settings.cpu_cores)
