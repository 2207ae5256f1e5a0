"""The sweeper: every `--sweep-interval`, removes the files past their expiry (uploads and batch outputs)
and the batches that ended longer ago than files are kept. A batch past its window is expired by the
runner, which alone writes a batch's files."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from embedserve.batches.store import BatchStore
from embedserve.files.store import FileStore

log = logging.getLogger("embedserve.batches")


def sweep_once(files: FileStore, batches: BatchStore, keep_s: float, now: float) -> tuple[int, int]:
    """Blocking. -> (files removed, batches removed)."""
    return files.sweep(now), batches.sweep(now, keep_s)


async def sweep_forever(
    files: FileStore,
    batches: BatchStore,
    *,
    interval_s: float,
    keep_s: float,
    clock: Callable[[], float] = time.time,
) -> None:
    """Until cancelled. A failure (the database away) is logged and tried again next time."""
    while True:
        try:
            removed = await asyncio.to_thread(sweep_once, files, batches, keep_s, clock())
        except Exception as exc:
            log.warning("the sweeper could not remove expired files and batches: %s", exc)
        else:
            if any(removed):
                log.info("sweeper: removed %d expired files and %d old batches", *removed)
        await asyncio.sleep(interval_s)
