"""Which models are fused (encoders, by config.json) and when memory is too short to try: pure
functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedserve.backends import fusion
from embedserve.backends.fusion import (
    EncoderShape,
    available_memory,
    encoder_shape,
    memory_shortfall,
)


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("bert", EncoderShape(12, 384)),
        ("xlm-roberta", EncoderShape(12, 384)),
        ("roberta", EncoderShape(12, 384)),
        ("qwen3", None),
        ("mpnet", None),
    ],
)
def test_only_encoders_the_fusions_match_are_fused(
    model_type: str, expected: EncoderShape | None, tmp_path: Path
) -> None:
    config = {"model_type": model_type, "num_attention_heads": 12, "hidden_size": 384}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert encoder_shape(tmp_path) == expected


def test_available_memory_is_memavailable_or_unknown(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory(meminfo) == 20_000_000 * 1024
    meminfo.write_text("MemTotal:       24576000 kB\n")  # an old kernel
    assert available_memory(meminfo) is None
    assert available_memory(tmp_path / "missing") is None  # not Linux


def test_fusion_is_refused_only_when_memory_is_known_to_be_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"x" * 1000)
    (tmp_path / "weights.bin").write_bytes(b"x" * 3000)  # external tensors count too
    monkeypatch.setattr(fusion, "available_memory", lambda: fusion.MEMORY_FACTOR * 4000)
    assert memory_shortfall(graph) is None
    monkeypatch.setattr(fusion, "available_memory", lambda: fusion.MEMORY_FACTOR * 4000 - 1)
    assert memory_shortfall(graph) == "fusion needs ~0.0 GiB of memory and 0.0 GiB is available"
    monkeypatch.setattr(fusion, "available_memory", lambda: None)
    assert memory_shortfall(graph) is None
