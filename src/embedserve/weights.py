"""A model folder's weight files: which names count as weights, and their sha256 (read once per version
of a file). A leaf: the catalog checks declared hashes with it, the ONNX cache and the int8 calibration
are keyed by it."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HEX = frozenset("0123456789abcdef")


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


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files (every shard of a sharded checkpoint), or none."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                shards = json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()
                return [folder / shard for shard in sorted(set(shards))]
            return [path]
    return []


def file_digest(path: Path) -> str:
    """A file in the Hugging Face cache is a symlink to a blob named by its own sha256: use the name
    rather than read gigabytes at every start."""
    blob = path.resolve().name
    if len(blob) == 64 and set(blob) <= _HEX:
        return blob
    return sha256_of(path)
