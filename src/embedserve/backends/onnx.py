"""ONNX Runtime backend for CPU: the model, its pooler and its Dense head (and bge-m3's sparse and ColBERT
heads) exported once to one ONNX graph (cached under the data dir, keyed by everything that shapes it),
encoders fused (fusion.py), optionally quantized to int8 (activation-smoothed first: int8.py), run with
ORT's full graph optimizations."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from embedserve.backends.batch import collate
from embedserve.backends.fusion import (
    EncoderShape,
    disagreement,
    encoder_shape,
    fuse,
    memory_shortfall,
    outputs,
)
from embedserve.backends.int8 import RECIPE as INT8_RECIPE
from embedserve.backends.int8 import calibration_texts, quantize_int8
from embedserve.backends.memory import available, peak_during
from embedserve.backends.threads import threads_per_worker, usable_cores
from embedserve.errors import ModelLoadError
from embedserve.logs import quieted
from embedserve.spec import ModelSpec
from embedserve.tokenization import ensure_last, pad_id_of, tokenizer_factory
from embedserve.types import Feeds, FloatMatrix, PassOutputs, Quantize, TokenBatch
from embedserve.weights import file_digest, weight_files

log = logging.getLogger("embedserve.backends.onnx")

# Bump when the exported graph changes for the same weights (pooling code, exporter settings, opset).
GRAPH_VERSION = 2  # 2: encoders fused (fusion.py)
OPSET = 18
TORCHSCRIPT_OPSET = 17  # encoders' export, the opset the fusions were measured on
#: The graph's outputs: the pooled vector, and with bge-m3's heads each token's weight and ColBERT vector.
POOLED = "pooled"
TOKEN_OUTPUTS = ("token_weights", "token_vectors")


def output_names(spec: ModelSpec) -> tuple[str, ...]:
    """The outputs the graph of `spec` has, in the order the torch graph returns them."""
    return (POOLED, *TOKEN_OUTPUTS) if spec.heads is not None else (POOLED,)


def graph_key(spec: ModelSpec, quantize: Quantize) -> str:
    """What the exported graph depends on: the weights (and Dense heads', and bge-m3's sparse and ColBERT
    heads'), pooling, and our version."""
    digest = hashlib.sha256()
    for path in weight_files(spec.folder):
        digest.update(file_digest(path).encode())
    for layer in spec.dense:
        for path in weight_files(layer.folder):
            digest.update(file_digest(path).encode())
        digest.update(f"{layer.in_features}:{layer.out_features}:{layer.activation}".encode())
    if (heads := spec.heads) is not None:  # a folder without them keys (and exports) as before
        for path in (heads.sparse_linear, heads.colbert_linear):
            digest.update(file_digest(path).encode())
        digest.update(f"heads:{heads.hidden_size}:{heads.colbert_dim}".encode())
    recipe = INT8_RECIPE if quantize == "int8" else quantize
    digest.update(f"{spec.pooling}:{recipe}:{GRAPH_VERSION}:{OPSET}:{TORCHSCRIPT_OPSET}".encode())
    return digest.hexdigest()[:24]


_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs hundreds of INFO lines (rewrite passes, skipped torchvision ops) and warnings;
    an operator's log gets our one line before and after instead."""
    with quieted(_NOISY_LOGGERS, logging.ERROR), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export(spec: ModelSpec, target: Path, feeds: Sequence[Feeds]) -> None:
    """Write the torch path (model + pooler + Dense) as ONNX with dynamic batch and length: encoders
    fused (fusion.py) and checked against the unfused graph on the calibration `feeds`; decoders as
    dynamo traces them. A fusion that fails, disagrees or would not fit in memory is logged and the
    unfused graph is served instead."""
    shape = encoder_shape(spec.folder)
    if shape is None:
        _trace(spec, target, for_fusion=False)
        return
    plain = Path(tempfile.mkdtemp(prefix=".plain-", dir=target.parent)) / "model.onnx"
    try:
        _trace(spec, plain, for_fusion=True)
        if (reason := memory_shortfall(plain)) is None:
            try:
                reason = _fuse_checked(spec, plain, target, shape, feeds)
            except Exception as exc:
                reason = str(exc)
        if reason is not None:
            import onnx

            log.warning("model '%s': operator fusion skipped, serving the unfused graph: %s", spec.id, reason)
            target.unlink(missing_ok=True)
            target.with_name(target.name + ".data").unlink(missing_ok=True)
            onnx.save(
                onnx.load(str(plain)), str(target), save_as_external_data=True, location=target.name + ".data"
            )
    finally:
        shutil.rmtree(plain.parent, ignore_errors=True)


def _fuse_checked(
    spec: ModelSpec, plain: Path, target: Path, shape: EncoderShape, feeds: Sequence[Feeds]
) -> str | None:
    """Fuse `plain` into `target`; None if the result agrees with its source on the shortest and the
    longest calibration batch, in every output, else why not."""
    fused = fuse(plain, target, shape)
    check = [feeds[0], feeds[-1]]
    names = output_names(spec)
    sources, results = outputs(plain, check, names), outputs(target, check, names)
    for feed, want, got in zip(check, sources, results, strict=True):
        if (reason := disagreement(want, got, feed["attention_mask"])) is not None:
            return f"the fused graph disagrees with its source ({reason})"
    log.info("model '%s': fused %s", spec.id, ", ".join(f"{n} {op}" for op, n in fused.items()))
    return None


def _trace(spec: ModelSpec, target: Path, *, for_fusion: bool) -> None:
    """Export the torch path. For fusion: eager attention through the TorchScript exporter, the operator
    pattern ORT's fusions match; otherwise SDPA through the dynamo exporter."""
    import torch

    from embedserve.backends.torch import TorchBackend

    torch_backend = TorchBackend(
        spec, device="cpu", dtype="float32", attention="eager" if for_fusion else "sdpa"
    )
    graph = torch_backend.graph().eval()
    ids = torch.full((2, 16), 5, dtype=torch.int64)  # two rows, the second padded: a real mask
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    outs = output_names(spec)
    names: dict[str, Any] = {"input_names": ["input_ids", "attention_mask"], "output_names": list(outs)}
    if for_fusion:
        axes = {0: "batch", 1: "length"}
        # pooled [batch, D]; token_weights [batch, length]; token_vectors [batch, length, C]
        out_axes = {name: ({0: "batch"} if name == POOLED else axes) for name in outs}
        options: dict[str, Any] = {
            "dynamo": False,
            "opset_version": TORCHSCRIPT_OPSET,
            "dynamic_axes": {"input_ids": axes, "attention_mask": axes, **out_axes},
        }
    else:
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}
        options = {
            "dynamo": True,
            "opset_version": OPSET,
            "external_data": True,
            "verbose": False,
            "dynamic_shapes": {"input_ids": dims, "attention_mask": dims},
        }
    with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
        torch.onnx.export(graph, (ids, mask), str(target), **names, **options)
    torch_backend.close()


def calibration_feeds(spec: ModelSpec, batch: int = 32) -> list[Feeds]:
    """The calibration text as the server would feed it: the model's tokenizer, its EOS rule and padding
    side, in length-sorted batches."""
    tok = tokenizer_factory(
        spec.folder, lower_case=spec.lower_case, truncate_to=min(spec.max_input_tokens, 512)
    )()
    ids = [enc.ids for enc in tok.encode_batch(calibration_texts())]
    if spec.eos_token is not None and (eos := tok.token_to_id(spec.eos_token)) is not None:
        ids = ensure_last(ids, eos)
    ids.sort(key=len)
    feeds: list[Feeds] = []
    for start in range(0, len(ids), batch):
        tokens = collate(ids[start : start + batch], pad_id_of(tok), spec.padding_side)
        feeds.append({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
    return feeds


def ensure_graph(spec: ModelSpec, cache_dir: Path, quantize: Quantize) -> Path:
    """The cached ONNX file for `spec`, exported (and quantized) first if missing. Writes go to a
    temporary folder renamed into place, so a crash or a concurrent start never leaves half a graph."""
    key = graph_key(spec, quantize)
    final = cache_dir / key / "model.onnx"
    if final.is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        fp32 = work / "fp32" / "model.onnx"
        fp32.parent.mkdir()
        log.info("model '%s': exporting to ONNX (once; cached in %s)", spec.id, final.parent)
        feeds = calibration_feeds(spec)  # checks the fusion, calibrates int8
        _export(spec, fp32, feeds)
        out = work / "out"
        if quantize == "int8":
            out.mkdir()
            log.info("model '%s': quantizing to int8 (%s)", spec.id, INT8_RECIPE)
            quantize_int8(fp32, out / "model.onnx", feeds)
        else:
            fp32.parent.rename(out)
        try:
            out.rename(final.parent)
        except OSError:  # another process finished first: use its graph
            if not final.is_file():
                raise
    except Exception as exc:
        raise ModelLoadError(f"model '{spec.id}': ONNX export failed: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("model '%s': ONNX graph ready in %.1f s", spec.id, time.perf_counter() - started)
    return final


#: A pass of more than this many rows x length^2 (a 2,048-token input; far above the CPU batcher's
#: batches of 256 token slots a thread) gives its memory back to the system once done. ORT's memory
#: arena would otherwise keep the peak of the largest pass for good (one 8,192-token input: gigabytes),
#: while small passes run faster on it: with the arena off, fp32 bulk and online lost ~4% and the
#: in-process baseline 6% (3 paired runs of `make bench`; int8 unchanged). Design note 32.
SHRINK_ABOVE = 1 << 22
#: Score matrices held at once, at the peak of a pass, per row (measured on the tiny checkpoints' graphs
#: at 2-8k tokens: fused ~1.0, unfused ~4.4 per head; the real models' figures, 4.6 GB for bge-m3 and
#: more than 22 GB for Qwen3-Embedding-0.6B at 8,192 tokens, agree). ORT's fused Attention kernel
#: computes one [heads, T, T] softmax in place; the exported decoders' attention is MatMul, scale,
#: mask add and Softmax, each its own [heads, T, T] tensor, and the mask's.
FUSED_ATTENTION_COPIES = 1
UNFUSED_ATTENTION_COPIES = 5


def attention_copies(path: Path) -> int:
    """How many score matrices a pass of the graph at `path` holds at once (fused or not)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    fused = any(node.op_type in ("Attention", "QAttention") for node in graph.node)
    return FUSED_ATTENTION_COPIES if fused else UNFUSED_ATTENTION_COPIES


class OnnxBackend:
    def __init__(
        self,
        spec: ModelSpec,
        *,
        cache_dir: Path,
        quantize: Quantize = "none",
        workers: int = 1,
        cores: int | None = None,
        spin: bool = False,
    ) -> None:
        """`workers`: forward passes that run at once on the one session (ORT's Run is thread-safe), each
        on cores // workers intra-op threads (backends.threads; `cores`: usable_cores() unless given).
        `spin`: ORT's default of busy-waiting intra-op threads, best when nothing else needs the cores
        (the benchmark's in-process baseline); a server sets it off (below)."""
        import onnxruntime as ort

        self._spec = spec
        path = ensure_graph(spec, cache_dir, quantize)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.workers = workers
        self.threads = threads_per_worker(cores or usable_cores(), workers)
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads sleep instead of spinning: in a server the event loop, the tokenizer and
        # the next batch's packing need those cores between forward passes (online load: +7% inputs/s,
        # bulk within noise; design note 27).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3  # errors only: ORT's warnings are not the operator's business
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"model '{spec.id}': cannot load the ONNX graph {path}: {exc}") from exc
        self._outputs = output_names(spec)
        self.dimensions = spec.dimensions
        self.kind, self.device = "onnx", "cpu"
        self.precision = "int8" if quantize == "int8" else "float32"
        self.vocab_size = self._vocab_size(spec)
        self.description = f"onnx cpu {self.precision}"
        self.path = path
        self.attention_copies = attention_copies(path)

    @staticmethod
    def _vocab_size(spec: ModelSpec) -> int:
        config: dict[str, Any] = json.loads((spec.folder / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config", config)
        return int(text["vocab_size"])

    def forward(self, batch: TokenBatch) -> FloatMatrix:
        return self.encode(batch, tokens=False).dense

    def encode(self, batch: TokenBatch, *, tokens: bool) -> PassOutputs:
        rows, length = batch.shape
        return self._run(batch, tokens=tokens, shrink=rows * length * length > SHRINK_ABOVE)

    def _run(self, batch: TokenBatch, *, tokens: bool, shrink: bool) -> PassOutputs:
        import onnxruntime as ort

        options = None
        if shrink:  # the arena gives back what this pass took once it is done
            options = ort.RunOptions()
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        # ORT hands back only the outputs asked for: a dense-only pass copies no [B, T, C] out (it runs
        # every node all the same: design note 57).
        names = list(self._outputs if tokens else self._outputs[:1])
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        values = [np.asarray(v, dtype=np.float32) for v in self._session.run(names, feeds, options)]
        if len(values) == 1:
            return PassOutputs(dense=values[0])
        pooled, weights, vectors = values  # [B, D], [B, T], [B, T, C]
        return PassOutputs(dense=pooled, token_weights=weights, token_vectors=vectors)

    def peak_memory(self, batch: TokenBatch) -> int | None:
        # The pass at its largest: with the token outputs, where the model has them (runtime.calibrate).
        return peak_during(lambda: self._run(batch, tokens=True, shrink=True))

    def memory_available(self) -> int:
        return available()

    def close(self) -> None:
        del self._session
