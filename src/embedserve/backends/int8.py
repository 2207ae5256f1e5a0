"""int8 for the exported ONNX graph: activation-smoothed (SmoothQuant) dynamic quantization, the
feed-forward down-projections and bge-m3's sparse and ColBERT heads kept in float32 (design notes 25, 57)."""

from __future__ import annotations

import importlib
import inspect
import logging
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedserve.types import Feeds, FloatMatrix

# Part of the int8 graph's cache key: change it whenever the recipe below changes.
RECIPE = "smoothquant-a0.7-v2"  # v2: fused Attention quantized too
ALPHA = 0.7
CALIBRATION_TEXTS = 256
# Standard-library modules whose docstrings are the calibration text: always installed, real prose and
# code, and none of the benchmark corpus's modules (benchmarks/corpus.py), so fidelity measured there is
# measured on text the calibration never saw.
CALIBRATION_MODULES = (
    "abc",
    "ast",
    "base64",
    "calendar",
    "csv",
    "datetime",
    "difflib",
    "enum",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "ipaddress",
    "locale",
    "mailbox",
    "mimetypes",
    "operator",
    "optparse",
    "pickle",
    "pprint",
    "queue",
    "random",
    "secrets",
    "selectors",
    "smtplib",
    "struct",
    "textwrap",
    "timeit",
    "traceback",
    "types",
    "uuid",
    "warnings",
    "weakref",
)

# Fused Attention (encoders, fusion.py) becomes QAttention: its input quantized dynamically, QKV in int8.
QUANTIZED_OPS = ("MatMul", "Attention")


def calibration_texts(count: int = CALIBRATION_TEXTS) -> list[str]:
    """`count` paragraphs (3-200 words) of standard-library docstrings, in a fixed shuffled order."""
    seen: set[str] = set()
    texts: list[str] = []
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        objects = [module] + [
            getattr(module, attr, None) for attr in sorted(dir(module)) if not attr.startswith("_")
        ]
        for obj in objects:
            doc = inspect.getdoc(obj) if obj is not None else None
            for paragraph in re.split(r"\n\s*\n", doc or ""):
                text = " ".join(paragraph.split())
                if text not in seen and 3 <= len(text.split()) <= 200:
                    seen.add(text)
                    texts.append(text)
    random.Random(0).shuffle(texts)
    return texts[:count]


def int8_nodes(model: Any) -> list[Any]:
    """The MatMuls and fused Attentions (QKV weight [hidden, 3 * hidden]) to quantize: those with a 2-D
    weight [K, N] and K <= N. Down-projections (K > N: the
    feed-forward output, intermediate -> hidden) stay float32: their inputs carry the outliers that cost
    the most fidelity (all-MiniLM-L6-v2 on the benchmark corpus, smoothed: min cosine 0.977 with them in
    int8, 0.998 without). Activation x activation MatMuls (attention scores) are never quantized, nor
    are bge-m3's heads (`head_nodes`: <0.4% of its compute, and its ColBERT vectors are scored token by
    token; design note 57)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    heads = {tuple(node.output) for node in head_nodes(model)}
    chosen = []
    for node in model.graph.node:
        if (
            node.op_type in QUANTIZED_OPS
            and len(weight := shapes.get(node.input[1], ())) == 2
            and weight[0] <= weight[1]
            and tuple(node.output) not in heads
        ):
            chosen.append(node)
    return chosen


def head_nodes(model: Any, pooled: str = "pooled") -> list[Any]:
    """The nodes that the graph's `pooled` output does not depend on: those of the heads that only its
    other outputs (bge-m3's token weights and vectors) read, whatever the exporter named them. None in
    a graph whose only output is `pooled`."""
    # A node is known by its outputs (each tensor has one producer): protobuf hands out a new Python
    # object for a node at every access, so neither identity nor id() tells two apart.
    producers = {name: node for node in model.graph.node for name in node.output}

    def upstream(names: list[str]) -> dict[tuple[str, ...], Any]:
        seen: dict[tuple[str, ...], Any] = {}
        while names:
            node = producers.get(names.pop())
            if node is not None and (key := tuple(node.output)) not in seen:
                seen[key] = node
                names.extend(node.input)
        return seen

    feeds_pooled = upstream([pooled])
    others = upstream([out.name for out in model.graph.output if out.name != pooled])
    return [node for key, node in others.items() if key not in feeds_pooled]


def smoothing_scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float = ALPHA) -> FloatMatrix:
    """Per input channel: s = x_max^alpha / w_max^(1 - alpha), kept within [1e-3, 1e3] so that a channel
    calibration never saw (or a zero weight row) cannot blow the weights up."""
    x = np.maximum(np.asarray(x_max, dtype=np.float64), 1e-5)
    w = np.maximum(np.asarray(w_max, dtype=np.float64), 1e-5)
    scales: FloatMatrix = np.clip(x**alpha / w ** (1 - alpha), 1e-3, 1e3).astype(np.float32)
    return scales


def activation_ranges(source: Path, feeds: Sequence[Feeds], names: Sequence[str]) -> dict[str, np.ndarray]:
    """max |x| per channel (last axis) of the tensors `names` of the graph at `source`, over every
    position of every calibration batch (padding included: dynamic quantization sees it too)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(source), load_external_data=False)
    del model.graph.output[:]
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = source.with_name("calibration.onnx")  # beside the weights it refers to
    onnx.save(model, str(probe))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
        ranges: dict[str, np.ndarray] = {}
        for feed in feeds:
            for name, value in zip(names, session.run(list(names), dict(feed)), strict=True):
                peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
        del session
    finally:
        probe.unlink(missing_ok=True)
    return ranges


def smooth(model: Any, nodes: Sequence[Any], ranges: Mapping[str, np.ndarray], alpha: float = ALPHA) -> None:
    """Rewrite `model` in place: each input of `nodes` passes through Mul(1/s) and the weights of every
    node reading it (unfused Q, K and V share one) are scaled by s row-wise. Exact in float32."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in nodes:
        readers.setdefault(node.input[0], []).append(node)
    inserts = []
    for k, (tensor, group) in enumerate(readers.items()):
        weights = [numpy_helper.to_array(initializers[node.input[1]]) for node in group]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scales = smoothing_scales(ranges[tensor], w_max, alpha)
        inverse = numpy_helper.from_array((1.0 / scales).astype(np.float32), f"embedserve_smooth_{k}")
        model.graph.initializer.append(inverse)
        smoothed = f"{tensor}__smoothed_{k}"
        inserts.append(
            (
                group[0],
                helper.make_node(
                    "Mul", [tensor, inverse.name], [smoothed], name=f"embedserve_smooth_mul_{k}"
                ),
            )
        )
        for node, weight in zip(group, weights, strict=True):
            scaled = numpy_helper.from_array((weight * scales[:, None]).astype(np.float32), node.input[1])
            initializers[node.input[1]].CopyFrom(scaled)
            node.input[0] = smoothed
    for first_reader, mul in inserts:  # right before its first reader: the graph stays sorted
        model.graph.node.insert(list(model.graph.node).index(first_reader), mul)


def _quiet_quantizer(record: logging.LogRecord) -> bool:
    """The quantizer logs on the root logger: a line per tensor at INFO, and advice to "pre-process" at
    every call. An operator's log gets our one line instead."""
    if "onnxruntime" not in record.pathname:
        return True
    return record.levelno >= logging.WARNING and not record.getMessage().startswith("Please consider")


def quantize_int8(source: Path, target: Path, feeds: Sequence[Feeds]) -> None:
    """Smooth the float32 graph at `source` on the calibration `feeds`, then quantize its chosen
    MatMuls dynamically (per-channel int8 weights) into `target`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    nodes = int8_nodes(model)
    if not nodes:  # quantize_dynamic reads no nodes_to_quantize as every node
        raise ValueError("the graph has no MatMul that int8 quantizes")
    ranges = activation_ranges(source, feeds, sorted({node.input[0] for node in nodes}))
    smooth(model, nodes, ranges)
    smoothed = target.with_name("smoothed.onnx")
    onnx.save(model, str(smoothed), save_as_external_data=True, location="smoothed.onnx.data")
    del model
    root = logging.getLogger()
    root.addFilter(_quiet_quantizer)
    try:
        quantize_dynamic(
            str(smoothed),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=[n.name for n in nodes],
            use_external_data_format=True,
            # contrib ops (Attention, SkipLayerNormalization) defeat ONNX shape inference
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.removeFilter(_quiet_quantizer)
        smoothed.unlink(missing_ok=True)
        smoothed.with_name("smoothed.onnx.data").unlink(missing_ok=True)
