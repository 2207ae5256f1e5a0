"""Writing files so that they survive a crash or a power cut: every byte written, and a new or renamed
file's name synced with its directory. Blocking; shared by the usage journal, the file store, the batch
runner and the corpus command's outputs."""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """`os.write` until every byte is written (a write may take fewer)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    finally:
        view.release()


def fsync_dir(path: Path) -> None:
    """A new file or a rename in `path` survives a power cut only once the directory itself is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
