"""The executor seam: how a batch's pending lines become `Ran` lines (`BatchExecutor`), and the local one,
which runs them in this server's engine, in its idle capacity. The runner alone writes the output files,
commits and bills; an executor only computes (design note 55)."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Protocol

from embedserve.batches.execute import Group, Ran, RenderError, grouped, run_group
from embedserve.batches.lines import RequestLine
from embedserve.batches.records import BatchRecord
from embedserve.engine import Engine
from embedserve.errors import EmbedServeError
from embedserve.files.store import FileStore
from embedserve.settings import Settings
from embedserve.types import Principal

#: Lines whose results wait in memory for the next commit, at most; and how long at most.
COMMIT_LINES = 256
COMMIT_INTERVAL_S = 0.5
#: Inputs of the lines in the engine at once: enough to keep every model worker busy between commits,
#: few enough that the online queue's bound and its wait are never this batch's (scheduler: batch work).
INPUTS_IN_FLIGHT = 512
READ_AHEAD_LINES = 64  # lines read from the input file per thread call


class BatchExecutor(Protocol):
    """Where a batch's lines run. `run` yields the lines as they are done (an empty list now and then
    while nothing is: the runner looks at the batch's status meanwhile), in any order, and stops
    once `go()` turns false: SIGTERM, a cancel or the window's end. Lines it yields that are no longer
    pending are dropped by the runner, so an executor may repeat itself after a crash."""

    def run(
        self,
        batch: BatchRecord,
        pending: Sequence[RequestLine],
        principal: Principal | EmbedServeError,
        go: Callable[[], bool],
    ) -> AsyncGenerator[list[Ran], None]: ...

    async def end(self, batch_id: str) -> None:
        """The batch is cancelled, expired or done: stop whatever still runs of it and drop what the
        executor kept of it."""

    async def close(self) -> None:
        """The server stops (work elsewhere goes on: the next start takes it up)."""


def read_lines(path: Path, lines: Sequence[RequestLine]) -> list[bytes]:
    """Blocking: the lines' bytes, by their offsets in the input file."""
    with open(path, "rb") as file:
        return [os.pread(file.fileno(), line.length, line.offset) for line in lines]


class _Window:
    """The inputs of the lines in the engine: a line waits while they would pass `limit` (a line alone
    always goes, however many inputs it has)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    async def enter(self, inputs: int) -> None:
        while self.used and self.used + inputs > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += inputs

    def leave(self, inputs: int) -> None:
        self.used -= inputs
        self._freed.set()


def _leave(window: _Window, inputs: int, _: object) -> None:
    window.leave(inputs)


class _Done:
    """What the groups in flight have done since the last yield."""

    def __init__(self) -> None:
        self.lines: list[Ran] = []

    def take(self) -> list[Ran]:
        taken, self.lines = self.lines, []
        return taken


class LocalExecutor:
    """The lines through this server's engine as batch work (online inputs always go first): a few
    groups in flight, within INPUTS_IN_FLIGHT inputs, read from the input file as they go."""

    def __init__(
        self, files: FileStore, engine: Engine, settings: Settings, render_error: RenderError
    ) -> None:
        self._files = files
        self._engine = engine
        self._settings = settings
        self._render_error = render_error

    async def _group(self, group: Group, principal: Principal | EmbedServeError, done: _Done) -> None:
        done.lines += await run_group(self._engine, group, principal, self._render_error)

    async def run(
        self,
        batch: BatchRecord,
        pending: Sequence[RequestLine],
        principal: Principal | EmbedServeError,
        go: Callable[[], bool],
    ) -> AsyncGenerator[list[Ran], None]:
        input_path = self._files.path(batch.input_file_id)
        window = _Window(INPUTS_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        done = _Done()
        last_yield = time.monotonic()
        try:
            for start in range(0, len(pending), READ_AHEAD_LINES):
                chunk = pending[start : start + READ_AHEAD_LINES]
                raws = await asyncio.to_thread(read_lines, input_path, chunk)
                groups, refused = grouped(chunk, raws, self._settings, self._render_error)
                done.lines += refused
                for group in groups:
                    inputs = sum(job.count for _, job in group)
                    await window.enter(inputs)
                    if not go():
                        window.leave(inputs)
                        break
                    task = asyncio.create_task(self._group(group, principal, done))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(functools.partial(_leave, window, inputs))
                    if len(done.lines) >= COMMIT_LINES or time.monotonic() - last_yield > COMMIT_INTERVAL_S:
                        yield done.take()
                        last_yield = time.monotonic()
                else:
                    continue
                break
            while tasks:  # the last lines in the engine, committed as they finish
                await asyncio.wait(set(tasks), timeout=COMMIT_INTERVAL_S)
                if done.lines:
                    yield done.take()
            yield done.take()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def end(self, batch_id: str) -> None:
        return None

    async def close(self) -> None:
        return None
