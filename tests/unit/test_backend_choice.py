"""runtime.choose_backend (pure): ONNX Runtime on CPU, torch on CUDA and for bf16/fp16; explicit choices
that cannot serve are errors, never silent fallbacks."""

from __future__ import annotations

import pytest

from embedserve.errors import ModelLoadError
from embedserve.runtime import choose_backend


@pytest.mark.parametrize(("device", "dtype", "cuda", "expected"), [
    ("auto", "auto", False, "onnx"),
    ("cpu", "auto", True, "onnx"),
    ("cpu", "float32", False, "onnx"),
    ("auto", "auto", True, "torch"),
    ("cuda", "auto", True, "torch"),
    ("cpu", "bfloat16", False, "torch"),
    ("auto", "float16", False, "torch"),
])
def test_auto_picks_onnx_on_cpu_in_float32_and_torch_otherwise(device: str, dtype: str, cuda: bool,
                                                                 expected: str) -> None:
    assert choose_backend("auto", device=device, dtype=dtype, quantize="none",  # type: ignore[arg-type]
                          cuda=cuda) == expected


def test_explicit_backends_are_kept() -> None:
    assert choose_backend("torch", device="cpu", dtype="auto", quantize="none", cuda=False) == "torch"
    assert choose_backend("onnx", device="auto", dtype="float32", quantize="none", cuda=False) == "onnx"


def test_int8_picks_onnx() -> None:
    assert choose_backend("auto", device="auto", dtype="auto", quantize="int8", cuda=False) == "onnx"


@pytest.mark.parametrize(("backend", "device", "dtype", "quantize", "cuda", "fragment"), [
    ("onnx", "cuda", "auto", "none", True, "--backend onnx runs on CPU"),
    ("onnx", "auto", "auto", "none", True, "--backend onnx runs on CPU"),
    ("onnx", "cpu", "bfloat16", "none", False, "--backend onnx runs on CPU"),
    ("torch", "cpu", "auto", "int8", False, "--quantize int8 runs on the onnx backend"),
    ("auto", "cuda", "auto", "int8", True, "--quantize int8 runs on the onnx backend"),
    ("auto", "cpu", "float16", "int8", False, "--quantize int8 runs on the onnx backend"),
])
def test_impossible_combinations_are_refused(backend: str, device: str, dtype: str, quantize: str,
                                             cuda: bool, fragment: str) -> None:
    with pytest.raises(ModelLoadError, match=fragment):
        choose_backend(backend, device=device, dtype=dtype, quantize=quantize,  # type: ignore[arg-type]
                       cuda=cuda)
