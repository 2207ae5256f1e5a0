"""A model's int8/uint8 calibration: the fixed texts of calibration.txt embedded once as documents are
served, the pooled vectors kept under the data dir by what they depend on, and each served width's
ranges derived from them, so that requests, restarts and replicas quantize alike (design note 59)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedserve.backends.base import Backend
from embedserve.backends.batch import collate
from embedserve.compact import Ranges, calibration_ranges
from embedserve.durable import fsync_dir
from embedserve.errors import ModelLoadError
from embedserve.postprocess import finish
from embedserve.spec import ModelSpec
from embedserve.tokenization import TokenizerPool, ensure_last
from embedserve.types import FloatMatrix
from embedserve.weights import file_digest, sha256_of, weight_files

log = logging.getLogger("embedserve.calibration")

#: 256 paragraphs (3-200 words) of CPython 3.11's standard-library docstrings (PSF License), one a
#: line, none of them in the benchmark corpus's modules; frozen so that the set does not change with the
#: Python that serves (backends/int8.py draws its own from the live docstrings: that graph is rebuilt
#: per machine anyway). Its digest is in every key.
TEXTS_FILE = Path(__file__).with_name("calibration.txt")
#: Bump when the recipe below changes for the same texts and weights.
RECIPE = "ranges-v1"
#: The calibration inputs are cut at this many tokens (as the server's `truncate` cuts): per-dimension
#: extremes need varied texts more than long ones, and it keeps the pass to about 9k tokens, ~1 s for
#: all-MiniLM-L6-v2 on two cores (design note 59).
MAX_TOKENS = 128
#: Rows per calibration pass (sorted by length, so a batch holds little padding).
BATCH = 32
#: Backends that compute the model itself: their vectors agree to float rounding, so they share one
#: file (whichever loads first computes it). Any other kind (the tests' fake) keys a file of its own.
MODEL_KINDS = frozenset({"torch", "onnx"})
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "tokenizer.model")


@dataclass(frozen=True, slots=True)
class Calibration:
    """What a model's int8/uint8 vectors are placed by."""

    key: str  # what the calibration vectors were computed from: their file's name
    digest: str  # of the vectors themselves: two servers with one digest quantize bit for bit alike
    ranges: Mapping[int, Ranges]  # by served width: [2, width] float32 minimum and maximum


def calibration_texts() -> list[str]:
    return TEXTS_FILE.read_text(encoding="utf-8").splitlines()


def served_widths(spec: ModelSpec) -> tuple[int, ...]:
    """Every width a request can get: the native one and each Matryoshka `dimensions`."""
    return tuple(sorted({spec.dimensions, *spec.matryoshka_dimensions}))


def calibration_key(spec: ModelSpec, prefix: str, kind: str) -> str:
    """What the calibration vectors depend on: the weights (and Dense heads'), the tokenizer, the
    pooling and the prompt, the texts and this recipe; not the backend that computes them, nor its
    precision (see MODEL_KINDS)."""
    digest = hashlib.sha256()
    for folder in (spec.folder, *(layer.folder for layer in spec.dense)):
        for path in weight_files(folder):
            digest.update(file_digest(path).encode())
    for layer in spec.dense:
        digest.update(f"{layer.in_features}:{layer.out_features}:{layer.activation}".encode())
    for name in _TOKENIZER_FILES:
        if (spec.folder / name).is_file():
            digest.update(f"{name}:{file_digest(spec.folder / name)}".encode())
    shape = [spec.pooling, spec.lower_case, spec.eos_token, min(spec.max_input_tokens, MAX_TOKENS), prefix]
    shape += [sha256_of(TEXTS_FILE), RECIPE, "" if kind in MODEL_KINDS else kind]
    digest.update(json.dumps(shape).encode())
    return digest.hexdigest()[:24]


def embed_texts(
    texts: list[str],
    tokenizer: TokenizerPool,
    backend: Backend,
    spec: ModelSpec,
    *,
    prefix: str,
    eos_id: int | None,
) -> FloatMatrix:
    """Blocking: `texts` as a request's inputs are embedded (the prompt, the EOS rule, cut to MAX_TOKENS
    as the server's `truncate` cuts an input) -> [N, D] pooled vectors, before finishing."""
    sequences = tokenizer.encode_sync(texts, prefix)
    if eos_id is not None:
        sequences = ensure_last(sequences, eos_id)
    limit = min(spec.max_input_tokens, MAX_TOKENS)
    sequences = [ids if len(ids) <= limit else [*ids[: limit - 1], ids[-1]] for ids in sequences]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    pooled = np.empty((len(sequences), backend.dimensions), dtype=np.float32)  # [N, D]
    for start in range(0, len(order), BATCH):
        rows = order[start : start + BATCH]
        batch = collate([sequences[i] for i in rows], tokenizer.pad_id, spec.padding_side)
        pooled[rows] = backend.forward(batch)
    return pooled


def ranges_of(pooled: FloatMatrix, spec: ModelSpec) -> dict[int, Ranges]:
    """Pure: each served width's ranges over the calibration vectors finished as the pipeline finishes
    a request's (truncated to the width, then normalized)."""
    ranges = {}
    for width in served_widths(spec):
        dimensions = None if width == spec.dimensions else width
        ranges[width] = calibration_ranges(finish(pooled, dimensions=dimensions, normalize=spec.normalize))
    return ranges


def load_calibration(
    spec: ModelSpec,
    tokenizer: TokenizerPool,
    backend: Backend,
    *,
    prefix: str,
    eos_id: int | None,
    cache_dir: Path,
) -> Calibration:
    """Blocking, at load: the calibration vectors from `cache_dir`, else embedded now and stored there
    (the first process to store them wins: one that lost the race reads the winner's)."""
    key = calibration_key(spec, prefix, backend.kind)
    path = cache_dir / f"{key}.npy"
    pooled = _read(path, backend.dimensions)
    if pooled is None:
        started = time.perf_counter()
        pooled = embed_texts(calibration_texts(), tokenizer, backend, spec, prefix=prefix, eos_id=eos_id)
        try:
            stored = _store(path, pooled)
        except OSError as exc:  # a read-only data dir serves on (torch needs nothing else of it)
            log.warning(
                "model '%s': cannot keep the int8 calibration in %s (%s): computed again at every start",
                spec.id,
                path,
                exc,
            )
            stored = True
        if not stored:
            pooled = _read(path, backend.dimensions)
            if pooled is None:
                raise ModelLoadError(f"model '{spec.id}': another process stored {path}, which does not read")
        log.info(
            "model '%s': int8 calibration computed in %.2f s (%s)",
            spec.id,
            time.perf_counter() - started,
            path,
        )
    digest = hashlib.sha256(np.ascontiguousarray(pooled).tobytes()).hexdigest()[:16]
    return Calibration(key=key, digest=digest, ranges=ranges_of(pooled, spec))


def _read(path: Path, width: int) -> FloatMatrix | None:
    try:
        pooled = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as exc:
        log.warning("ignoring the unreadable calibration file %s: %s", path, exc)
        return None
    if pooled.dtype != np.float32 or pooled.ndim != 2 or pooled.shape[1] != width or not len(pooled):
        log.warning("ignoring the calibration file %s: shape %s, dtype %s", path, pooled.shape, pooled.dtype)
        return None
    out: FloatMatrix = pooled
    return out


def _store(path: Path, pooled: FloatMatrix) -> bool:
    """Written in full to a temporary file, then linked into place -> False if another process's file
    is there already (theirs stands: the servers it published ranges to agree with it). A file that
    _read refused is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as fh:
            np.save(fh, pooled, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists() and _read(path, pooled.shape[1]) is None:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)
