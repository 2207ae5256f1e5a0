"""How much memory a forward pass takes on the host, and how much the host has: the process's peak
resident size during a call (Linux: VmHWM, reset through /proc/self/clear_refs), the memory available
to it (MemAvailable, or its cgroup's limit when lower), and handing freed heap back to the system."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("embedserve.backends.memory")

_PROC = Path("/proc/self")
_CGROUP = Path("/sys/fs/cgroup")


def _status_kib(field: str) -> int | None:
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def trim() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): after a large pass, the
    allocator would otherwise keep them resident."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def peak_during(call: Callable[[], object]) -> int | None:
    """Bytes the process's resident size rose to above its level before `call`, at the peak; None
    where the kernel offers no resettable peak (not Linux)."""
    trim()
    before = _status_kib("VmRSS")
    try:
        (_PROC / "clear_refs").write_text("5")  # resets VmHWM to the current resident size
    except OSError:
        return None
    call()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def available() -> int:
    """Bytes the process may still take: MemAvailable, or what is left under its cgroup's limit when
    that is lower (a container)."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        used = int((_CGROUP / "memory.current").read_text().strip())
        if limit != "max":
            left = int(limit) - used
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free if free is not None else 8 << 30  # no way to tell: assume a small machine
