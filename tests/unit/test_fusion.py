"""Which models are fused (encoders, by config.json) and how agreement is scored: pure functions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedserve.backends.fusion import EncoderShape, agreement, encoder_shape


@pytest.mark.parametrize(("model_type", "expected"), [
    ("bert", EncoderShape(12, 384)), ("xlm-roberta", EncoderShape(12, 384)),
    ("roberta", EncoderShape(12, 384)), ("qwen3", None), ("mpnet", None),
])
def test_only_encoders_the_fusions_match_are_fused(model_type: str, expected: EncoderShape | None,
                                                  tmp_path: Path) -> None:
    config = {"model_type": model_type, "num_attention_heads": 12, "hidden_size": 384}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert encoder_shape(tmp_path) == expected


def test_agreement_is_the_worst_row_cosine() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    assert agreement(a, a * 7) == pytest.approx(1.0)
    b = a.copy()
    b[1] = [2.0, 0.0]  # one row turned a right angle
    assert agreement(a, b) == pytest.approx(0.0, abs=1e-12)
    assert agreement(a, -a) == pytest.approx(-1.0)
    zero = np.zeros_like(a)
    assert agreement(a, zero) == pytest.approx(0.0)  # a graph that outputs zeros never agrees
