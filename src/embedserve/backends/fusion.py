"""Operator fusion for encoder graphs: ONNX Runtime's transformer optimizer rewrites each BERT-style layer
into its fused CPU kernels (1.15x faster in float32, 1.5x in int8 on all-MiniLM-L6-v2: design note 26);
the fused graph is checked against its source before it is used, so a wrong match is never served."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedserve.logs import quieted
from embedserve.postprocess import min_cosine
from embedserve.types import Feeds, FloatMatrix, IntMatrix

# config.json `model_type`s whose layers ORT's "bert" fusions match (position ids may differ: RoBERTa's
# embeddings then simply stay unfused).
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})
# Minimum cosine between the fused graph's output and its source's, row by row (measured: 0.99999994),
# and between their ColBERT vectors, token by token.
AGREEMENT = 0.99999
# Largest difference between their token weights (bge-m3's sparse head), relative to the largest weight:
# a weight can be 0 (relu), where a cosine would say nothing.
WEIGHT_AGREEMENT = 1e-4
# The optimizer holds several copies of the weights at once (its shape inference serializes the whole
# model): peak memory measured at 6.9x the graph's size on a 2.3 GB encoder. Below this many times the
# graph's size in available memory, fusion is skipped rather than risk the OOM killer.
MEMORY_FACTOR = 8


@dataclass(frozen=True)
class EncoderShape:
    num_heads: int
    hidden_size: int


def encoder_shape(folder: Path) -> EncoderShape | None:
    """The attention geometry of a model whose layers the fusions match, or None (not an encoder)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in ENCODER_TYPES:
        return None
    return EncoderShape(int(config["num_attention_heads"]), int(config["hidden_size"]))


def graph_bytes(source: Path) -> int:
    """The size of the graph at `source` with its weights (the TorchScript exporter writes one file per
    tensor beside it when the model is over 2 GB)."""
    return sum(path.stat().st_size for path in source.parent.iterdir() if path.is_file())


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), None where unknown."""
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_shortfall(source: Path) -> str | None:
    """Why fusing `source` would not fit in memory now, or None if it fits (or nobody can tell)."""
    needed, available = MEMORY_FACTOR * graph_bytes(source), available_memory()
    if available is None or needed <= available:
        return None
    return f"fusion needs ~{needed / 2**30:.1f} GiB of memory and {available / 2**30:.1f} GiB is available"


def fuse(source: Path, target: Path, shape: EncoderShape) -> dict[str, int]:
    """Write the fused graph of `source` to `target` (weights in `target`.data); return how many of each
    fused operator it holds. The attention mask stays the raw [batch, length] mask, so any padding side
    and any mask the batcher builds mean what they mean in the source graph. The optimizer recognises
    the TorchScript exporter's pattern of eager attention, so encoders are exported that way
    (backends/onnx.py); decoders (Qwen3) keep the unfused dynamo graph."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)
    with quieted(_optimizer_loggers(), logging.WARNING):
        model = optimize_model(
            str(source),
            model_type="bert",
            num_heads=shape.num_heads,
            hidden_size=shape.hidden_size,
            opt_level=0,
            optimization_options=options,
        )
        model.save_model_to_file(str(target), use_external_data_format=True)
        stats: dict[str, int] = model.get_fused_operator_statistics()
    return {op: count for op, count in stats.items() if count}


def _optimizer_loggers() -> list[str]:
    """The optimizer logs every rewrite at INFO, from loggers named after its modules (imported both
    as `fusion_base` and as `onnxruntime.transformers.fusion_base`); the caller logs one summary."""
    import onnxruntime.transformers as package

    stems = sorted(path.stem for path in Path(package.__file__).parent.glob("*.py"))
    return [name for stem in stems for name in (stem, f"onnxruntime.transformers.{stem}")]


def outputs(path: Path, feeds: Sequence[Feeds], names: Sequence[str]) -> list[list[FloatMatrix]]:
    """The outputs `names` of the graph at `path` on each feed, with ORT's full optimizations (as
    served)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    try:
        return [
            [np.asarray(value, dtype=np.float32) for value in session.run(list(names), dict(feed))]
            for feed in feeds
        ]
    finally:
        del session


def disagreement(want: Sequence[FloatMatrix], got: Sequence[FloatMatrix], mask: IntMatrix) -> str | None:
    """Why one pass's outputs `got` do not match `want` (same graph outputs, same [B, T] feed), or None:
    the pooled rows by cosine; the per-token outputs at the real tokens only (padding's are never
    served): ColBERT vectors by cosine, token weights by their largest difference."""
    pooled = min_cosine(want[0], got[0])
    if not pooled >= AGREEMENT:  # NaN disagrees too
        return f"pooled min cosine {pooled:.6f}"
    if len(want) == 1:
        return None
    real = mask.astype(bool)  # [B, T]
    weights_want, weights_got = want[1][real], got[1][real]  # [n]
    scale = max(float(np.abs(weights_want).max(initial=0.0)), 1e-6)
    error = float(np.abs(weights_got - weights_want).max(initial=0.0)) / scale
    if not error <= WEIGHT_AGREEMENT:  # NaN disagrees too
        return f"token weights differ by {error:.2e} of the largest"
    vectors = min_cosine(want[2][real], got[2][real])  # [n, C]
    if not vectors >= AGREEMENT:
        return f"ColBERT vectors min cosine {vectors:.6f}"
    return None
