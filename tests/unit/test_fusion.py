"""Which models are fused (encoders, by config.json), when memory is too short to try, and when a fused
graph's outputs disagree with its source's: pure functions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedserve.backends import fusion
from embedserve.backends.fusion import (
    EncoderShape,
    available_memory,
    disagreement,
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


def _pass(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = np.maximum(rng.normal(size=(2, 5)), 0).astype(np.float32)  # [B, T]
    weights[1] = 0.0  # relu may zero a whole row: that agrees with a zero row
    return [
        rng.normal(size=(2, 8)).astype(np.float32),  # pooled [B, D]
        weights,
        rng.normal(size=(2, 5, 4)).astype(np.float32),  # token vectors [B, T, C]
    ]


MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def test_outputs_that_agree_at_the_real_tokens_agree_whatever_the_padding_holds() -> None:
    want, got = _pass(), _pass()
    got[1][1, 3:] = 7.0  # padding positions: never served
    got[2][1, 4] = -got[2][1, 4]
    got[0] = got[0] * 1.0000001
    assert disagreement(want, got, MASK) is None
    assert disagreement(want[:1], got[:1], MASK) is None  # a graph with the pooled output alone


@pytest.mark.parametrize(
    ("output", "where", "reason"),
    [
        (0, (1, 2), "pooled min cosine"),
        (1, (1, 2), "token weights differ by"),
        (1, (0, 0), "token weights differ by"),
        (2, (1, 2), "ColBERT vectors min cosine"),
    ],
)
def test_any_output_that_differs_at_a_real_token_disagrees(
    output: int, where: tuple[int, int], reason: str
) -> None:
    want, got = _pass(), _pass()
    got[output][where] = -got[output][where] - 1.0
    found = disagreement(want, got, MASK)
    assert found is not None and found.startswith(reason)


def test_nan_disagrees() -> None:
    want, got = _pass(), _pass()
    got[2][0, 0, 0] = np.nan
    assert disagreement(want, got, MASK) is not None
    got = _pass()
    got[0][0, 0] = np.nan
    assert disagreement(want, got, MASK) is not None
