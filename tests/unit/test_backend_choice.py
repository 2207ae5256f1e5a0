"""backends.factory.choose_backend (pure): ONNX Runtime on CPU, torch on CUDA and for bf16/fp16;
explicit choices that cannot serve are errors, never silent fallbacks. backends.threads: how a CPU
backend spreads over the cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from embedserve.backends.factory import choose_backend
from embedserve.backends.threads import default_workers, threads_per_worker, usable_cores
from embedserve.errors import ModelLoadError


@pytest.mark.parametrize(
    ("device", "dtype", "cuda", "expected"),
    [
        ("auto", "auto", False, "onnx"),
        ("cpu", "auto", True, "onnx"),
        ("cpu", "float32", False, "onnx"),
        ("auto", "auto", True, "torch"),
        ("cuda", "auto", True, "torch"),
        ("cpu", "bfloat16", False, "torch"),
        ("auto", "float16", False, "torch"),
    ],
)
def test_auto_picks_onnx_on_cpu_in_float32_and_torch_otherwise(
    device: str, dtype: str, cuda: bool, expected: str
) -> None:
    assert (
        choose_backend(
            "auto",
            device=device,
            dtype=dtype,
            quantize="none",  # type: ignore[arg-type]
            cuda=cuda,
        )
        == expected
    )


def test_explicit_backends_are_kept() -> None:
    assert choose_backend("torch", device="cpu", dtype="auto", quantize="none", cuda=False) == "torch"
    assert choose_backend("onnx", device="auto", dtype="float32", quantize="none", cuda=False) == "onnx"


def test_int8_picks_onnx() -> None:
    assert choose_backend("auto", device="auto", dtype="auto", quantize="int8", cuda=False) == "onnx"


@pytest.mark.parametrize(
    ("backend", "device", "dtype", "quantize", "cuda", "fragment"),
    [
        ("onnx", "cuda", "auto", "none", True, "--backend onnx runs on CPU"),
        ("onnx", "auto", "auto", "none", True, "--backend onnx runs on CPU"),
        ("onnx", "cpu", "bfloat16", "none", False, "--backend onnx runs on CPU"),
        ("torch", "cpu", "auto", "int8", False, "--quantize int8 runs on the onnx backend"),
        ("auto", "cuda", "auto", "int8", True, "--quantize int8 runs on the onnx backend"),
        ("auto", "cpu", "float16", "int8", False, "--quantize int8 runs on the onnx backend"),
    ],
)
def test_impossible_combinations_are_refused(
    backend: str, device: str, dtype: str, quantize: str, cuda: bool, fragment: str
) -> None:
    with pytest.raises(ModelLoadError, match=fragment):
        choose_backend(
            backend,
            device=device,
            dtype=dtype,
            quantize=quantize,  # type: ignore[arg-type]
            cuda=cuda,
        )


# ---- backends.threads: workers and threads per forward pass on CPU ------------------------------------


@pytest.mark.parametrize(
    ("cores", "workers", "threads"),
    [
        (1, 1, 1),
        (2, 2, 1),
        (3, 2, 1),
        (4, 2, 2),
        (8, 2, 4),
        (16, 4, 4),
        (64, 16, 4),
    ],
)
def test_cpu_passes_run_side_by_side_on_at_most_4_threads_each(
    cores: int, workers: int, threads: int
) -> None:
    assert default_workers(cores) == workers
    assert threads_per_worker(cores, workers) == threads
    assert workers * threads <= cores


def test_more_workers_than_cores_still_get_a_thread_each() -> None:
    assert threads_per_worker(2, 8) == 1


def test_usable_cores_follow_the_affinity_mask() -> None:
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert usable_cores() == len(os.sched_getaffinity(0))


def test_more_than_one_worker_on_the_torch_backend_is_refused_before_loading(tmp_path: Path) -> None:
    from embedserve.runtime import make_backend
    from embedserve.settings import Settings
    from support import bundled_folder, spec_of

    spec = spec_of(bundled_folder())
    settings = Settings(backend="torch", device="cpu", model_workers=2, data_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="--model-workers applies to the onnx backend"):
        make_backend(spec, settings)
