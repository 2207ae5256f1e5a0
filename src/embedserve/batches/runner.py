"""The batch runner: takes the oldest unfinished batch, validates its input file, hands its lines to the
executor (this server's engine in its idle capacity, or a Ray cluster: batches/executor.py), and writes
their output, exactly once across crashes and restarts (design notes 48, 55):

- a line's result is appended to the output (or error) file, the file fsynced, and only then is the
  line marked done in the database, in one transaction with the new committed length of each file and
  the line's usage record (whose id is made of the batch id and the line: billed once however often
  the line runs);
- a run of a batch starts by cutting its files back to the committed lengths: whatever a crash left
  beyond them belongs to lines still pending, which run again.

One runner per files directory (an flock on it) runs batches one after another, in the order they came."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from embedserve.batches.execute import Ran
from embedserve.batches.executor import BatchExecutor
from embedserve.batches.lines import InputCheck, RequestLine, error_line
from embedserve.batches.records import BatchError, BatchRecord, BatchStatus
from embedserve.batches.store import BatchStore, LineDone
from embedserve.durable import fsync_dir, write_all
from embedserve.engine import Engine
from embedserve.errors import EmbedServeError, ModelLoadError, ServiceUnavailable, ShuttingDown
from embedserve.files.records import OUTPUT_PURPOSE, new_file_id
from embedserve.files.store import FileStore
from embedserve.settings import Settings
from embedserve.types import Principal, UsageRecord

log = logging.getLogger("embedserve.batches")

LOCK_FILE = ".runner.lock"

#: A key id -> its Principal now (AuthenticationFailed once revoked or expired).
PrincipalOf = Callable[[str], Principal]


@dataclass
class _Outputs:
    """A running batch's output and error files, opened for appending past their committed lengths, and
    what waits for the next commit."""

    out: int
    err: int
    out_bytes: int
    err_bytes: int
    done: list[LineDone] = field(default_factory=list)
    out_lines: list[bytes] = field(default_factory=list)
    err_lines: list[bytes] = field(default_factory=list)

    def close(self) -> None:
        os.close(self.out)
        os.close(self.err)


def _open_at(path: Path, committed: int) -> int:
    """The file open for appending, cut back to its committed length (a torn or uncommitted write
    beyond it is dropped: its lines are still pending)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    size = os.fstat(fd).st_size
    if size == 0:  # (new, or empty): its name must survive a power cut as its first commit will
        fsync_dir(path.parent)
    if size > committed:
        log.info(
            "batch file %s: dropping %d bytes past the committed %d", path.name, size - committed, committed
        )
        os.ftruncate(fd, committed)
        os.fsync(fd)
    elif size < committed:  # never, unless the file was damaged: the committed lines are gone
        os.close(fd)
        raise RuntimeError(f"batch file {path} holds {size} bytes, fewer than the {committed} committed")
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def _append(fd: int, lines: list[bytes]) -> int:
    """Blocking: append and fsync -> the file's new length."""
    write_all(fd, b"".join(lines))
    os.fsync(fd)
    return os.fstat(fd).st_size


def _check_file(path: Path, check: InputCheck) -> None:
    """Blocking: every line of the input file through `check`, one line in memory at a time."""
    offset = 0
    with open(path, "rb") as file:
        for raw in file:
            check.feed(raw, offset)
            offset += len(raw)


class BatchRunner:
    """`run()` is the server's task that runs every batch; `wake()` and `stop()` are its two signals.
    `principal_of` comes from the key ring, `executor` runs the lines: the runner knows neither how."""

    def __init__(
        self,
        store: BatchStore,
        files: FileStore,
        engine: Engine,
        settings: Settings,
        *,
        principal_of: PrincipalOf,
        executor: BatchExecutor,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._files = files
        self._engine = engine
        self._settings = settings
        self._principal_of = principal_of
        self._executor = executor
        self._poll_s = poll_s
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        self._lock_fd: int | None = None

    def wake(self) -> None:
        """A batch was created or cancelled: look now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """SIGTERM: take no new line; the lines in the engine finish and are committed (the next start
        resumes the rest)."""
        self._stopping = True
        self._wake.set()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._poll_s)
        self._wake.clear()

    def _take_lock(self) -> bool:
        """Blocking: whether this process runs the batches of its files directory (one process does)."""
        if self._lock_fd is not None:
            return True
        root = self._settings.files_path
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def run(self) -> None:
        """Until stopped: the oldest unfinished batch, one step of it at a time."""
        try:
            # A model that failed to load leaves its lines pending (until their batch expires); the
            # other models' batches run.
            with contextlib.suppress(ModelLoadError):
                await self._engine.wait_loaded()
            while not self._stopping:
                if not await asyncio.to_thread(self._take_lock):
                    await self._pause()
                    continue
                try:
                    batch = await asyncio.to_thread(self._store.next_unfinished)
                    if batch is None:
                        await self._pause()
                    elif not await self._advance(batch):
                        await self._pause()  # no progress (the database, a model): not a busy loop
                except ShuttingDown:
                    return
                except ServiceUnavailable as exc:
                    log.warning("batches paused: %s", exc.message)
                    await self._pause()
                except Exception:
                    log.exception("the batch runner failed; retrying")
                    await self._pause()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            await self._executor.close()

    async def _advance(self, batch: BatchRecord) -> bool:
        """One step of a batch's life. -> whether it made progress."""
        now = self._clock()
        if batch.status == "validating" and now < batch.expires_at:
            await self._validate(batch)
            return True
        if batch.status == "finalizing":
            await self._finish(batch, "completed")
            return True
        if now >= batch.expires_at:
            await self._write_off(batch, "expired")
            return True
        if batch.status == "cancelling":
            await self._write_off(batch, "cancelled")
            return True
        return await self._run_lines(batch)

    # ---- validating ------------------------------------------------------------------------------

    async def _validate(self, batch: BatchRecord) -> None:
        settings = self._settings
        check = InputCheck(
            endpoint=batch.endpoint,
            max_requests=settings.batch_max_requests,
            max_inputs=settings.batch_max_inputs,
        )
        try:
            await asyncio.to_thread(_check_file, self._files.path(batch.input_file_id), check)
        except FileNotFoundError:
            check.errors.append(
                BatchError(code="file_not_found", message=f"The input file {batch.input_file_id} is gone.")
            )
        errors = check.finish()
        if not errors:
            queued = await asyncio.to_thread(self._store.queued_tokens, batch.owner)
            if queued + check.token_bound > settings.batch_max_queued_tokens:
                errors.append(
                    BatchError(
                        code="token_limit_exceeded",
                        message=(
                            f"Enqueued token limit reached: this batch may hold up to {check.token_bound} "
                            f"tokens, and the key's unfinished batches {queued}, of at most "
                            f"{settings.batch_max_queued_tokens} (--batch-max-queued-tokens). Retry once "
                            "they have completed."
                        ),
                    )
                )
        if errors:
            await asyncio.to_thread(self._store.fail, batch.id, errors)
            log.info("batch %s failed validation (%d errors)", batch.id, len(errors))
            return
        await asyncio.to_thread(
            self._store.start,
            batch.id,
            check.requests,
            model=check.model,
            output_file_id=new_file_id(),
            error_file_id=new_file_id(),
        )
        log.info("batch %s: %d requests, %d inputs, in progress", batch.id, len(check.requests), check.inputs)

    # ---- running lines ---------------------------------------------------------------------------

    async def _outputs(self, batch: BatchRecord) -> _Outputs:
        assert batch.output_file_id is not None and batch.error_file_id is not None
        out_path, err_path = self._files.path(batch.output_file_id), self._files.path(batch.error_file_id)

        def open_both() -> _Outputs:
            out = _open_at(out_path, batch.output_bytes)
            try:
                err = _open_at(err_path, batch.error_bytes)
            except BaseException:
                os.close(out)
                raise
            return _Outputs(out=out, err=err, out_bytes=batch.output_bytes, err_bytes=batch.error_bytes)

        return await asyncio.to_thread(open_both)

    async def _commit(self, batch_id: str, outputs: _Outputs) -> BatchStatus:
        """The waiting results to disk, then to the database. A failed commit ends the run: the next one
        starts from the database's committed lengths, whatever reached the files."""
        done, out_lines, err_lines = outputs.done, outputs.out_lines, outputs.err_lines
        outputs.done, outputs.out_lines, outputs.err_lines = [], [], []

        def write() -> tuple[int, int]:
            out = _append(outputs.out, out_lines) if out_lines else outputs.out_bytes
            err = _append(outputs.err, err_lines) if err_lines else outputs.err_bytes
            return out, err

        out_bytes, err_bytes = await asyncio.to_thread(write)
        status = await asyncio.to_thread(
            self._store.commit, batch_id, done, output_bytes=out_bytes, error_bytes=err_bytes
        )
        outputs.out_bytes, outputs.err_bytes = out_bytes, err_bytes
        return status

    async def _run_lines(self, batch: BatchRecord) -> bool:
        """Hand the pending lines to the executor and commit what it yields, until none is left (then the
        batch finalizes), or a cancel, the window's end or SIGTERM stops it. -> whether any line was
        done."""
        pending = await asyncio.to_thread(self._store.pending, batch.id)
        waiting = {line.line: line for line in pending}
        outputs = await self._outputs(batch)
        status: BatchStatus = batch.status
        progressed = False
        try:
            principal: Principal | EmbedServeError = self._principal_of(batch.owner)
        except EmbedServeError as exc:  # the owner's key was revoked or has expired: each line says so
            principal = exc

        def go() -> bool:
            return not self._stopping and status == "in_progress" and self._clock() < batch.expires_at

        try:
            # The executor stops once go() is false, after yielding what it has in flight (SIGTERM: the
            # lines in the engine finish and are committed).
            async with contextlib.aclosing(self._executor.run(batch, pending, principal, go)) as results:
                async for ran in results:
                    # A line yielded twice (a shard found again after a crash) is committed once.
                    fresh = [(waiting.pop(r.line), r) for r in ran if r.line in waiting]
                    if fresh:
                        self._account(batch, principal, fresh, outputs)
                        status = await self._commit(batch.id, outputs)
                        progressed = True
                    else:
                        reloaded = await asyncio.to_thread(self._store.load, batch.id)
                        status = reloaded.status if reloaded is not None else "cancelled"
        finally:
            outputs.close()
        if status == "in_progress" and not self._stopping and self._clock() < batch.expires_at:
            left = await asyncio.to_thread(self._store.pending, batch.id)
            if not left:
                await asyncio.to_thread(self._store.finalizing, batch.id)
                return True
        return progressed

    def _account(
        self,
        batch: BatchRecord,
        principal: Principal | EmbedServeError,
        lines: list[tuple[RequestLine, Ran]],
        outputs: _Outputs,
    ) -> None:
        """Lines done, to their files and onto the owner's account at the batch price: the usage record
        of a line is `<batch id>:<line>`, billed once however often it ran."""
        for line, ran in lines:
            if not ran.ok or ran.model is None or isinstance(principal, EmbedServeError):
                outputs.err_lines.append(ran.text)
                outputs.done.append(LineDone(line.line, "failed", line.token_bound))
                continue
            spec = self._engine.catalog.resolve(ran.model)
            usage = UsageRecord(
                key_id=principal.key_id,
                model=spec.id,
                prompt_tokens=ran.tokens,
                inputs=ran.inputs,
                request_id=ran.request_id,
                created_at=ran.created_at,
                latency_ms=ran.latency_ms,
                price_per_million=spec.batch_price,
                record_id=f"{batch.id}:{line.line}",
                batch_id=batch.id,
            )
            self._engine.metrics.observe_embedded(spec.id, principal.key_id, ran.inputs, ran.tokens)
            outputs.out_lines.append(ran.text)
            outputs.done.append(LineDone(line.line, "completed", line.token_bound, ran.tokens, usage))

    # ---- ending ----------------------------------------------------------------------------------

    async def _write_off(self, batch: BatchRecord, status: BatchStatus) -> None:
        """Cancelled or expired: the lines not done go to the error file as never run, then the batch
        ends with the output of those that were. Whatever still runs of it stops first."""
        await self._executor.end(batch.id)
        if batch.output_file_id is not None:
            pending = await asyncio.to_thread(self._store.pending, batch.id)
            outputs = await self._outputs(batch)
            try:
                code = "batch_cancelled" if status == "cancelled" else "batch_expired"
                message = (
                    "The batch was cancelled before this request ran."
                    if status == "cancelled"
                    else "This request could not be executed before the completion window expired."
                )
                for line in pending:
                    outputs.err_lines.append(error_line(line.custom_id, code, message))
                    outputs.done.append(LineDone(line.line, "failed", line.token_bound))
                await self._commit(batch.id, outputs)
            finally:
                outputs.close()
        reloaded = await asyncio.to_thread(self._store.load, batch.id)
        assert reloaded is not None
        await self._finish(reloaded, status)

    async def _finish(self, batch: BatchRecord, status: BatchStatus) -> None:
        """Register the output and error files (those with a line in them) for the owner, then end."""
        for file_id, size, kind in (
            (batch.output_file_id, batch.output_bytes, "output"),
            (batch.error_file_id, batch.error_bytes, "error"),
        ):
            if file_id is None:
                continue
            if size == 0:
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(os.unlink, self._files.path(file_id))
                continue
            record = self._files.new_record(
                file_id, batch.owner, f"{batch.id}_{kind}.jsonl", OUTPUT_PURPOSE, size
            )
            await asyncio.to_thread(self._files.register, record)
        await asyncio.to_thread(self._store.finish, batch.id, status)
        await self._executor.end(batch.id)
        log.info(
            "batch %s %s: %d completed, %d failed, %d tokens",
            batch.id,
            status,
            batch.completed,
            batch.failed,
            batch.input_tokens,
        )
