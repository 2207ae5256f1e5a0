"""A model folder's weight files: which names count as weights, and their sha256 (read once per version
of a file). A leaf: the catalog checks declared hashes with it, the ONNX backend keys its cache by it."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def sha256_of(path: Path) -> str:
    """sha256 of a file, read once per version of it (the start-up check and the ONNX cache key both
    ask for the weights' hash)."""
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
