"""A corpus through the engine: chunks read ahead in a thread, a few in flight at once (so the model
never waits for the reading or the writing), their vectors written in input order, a checkpoint at
least every CHECKPOINT_S seconds. Only the chunks in flight and the output's buffer are held."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

from embedserve.corpus.chunks import Chunk, locate
from embedserve.corpus.output import Output
from embedserve.engine import Embeddings, Engine
from embedserve.errors import InvalidRequest
from embedserve.settings import Settings

#: Chunks embedding at once: while the oldest is written, the others keep the model's queue full.
IN_FLIGHT = 4
#: However slow the model, a kill loses at most this much work.
CHECKPOINT_S = 30.0


@dataclass(frozen=True, slots=True)
class Job:
    """What every chunk is embedded with (the fields of a request besides its input)."""

    model: str
    dimensions: int | None = None
    input_type: str | None = None
    instruction: str | None = None


@dataclass
class Tally:
    rows: int = 0
    tokens: int = 0


Written = Callable[[int, int], None]


async def embed_chunks(
    engine: Engine,
    job: Job,
    chunks: Iterator[Chunk],
    output: Output,
    *,
    where: Callable[[int], str],
    writer: Executor | None = None,
    on_written: Written = lambda rows, tokens: None,
    in_flight: int = IN_FLIGHT,
    checkpoint_s: float = CHECKPOINT_S,
) -> Tally:
    """Embed every chunk and append its rows to `output` in order. A bad record (the reader's error, or
    the engine's refusal of one text, then named by its line) ends the run once the chunks before it
    are written, so a resume after the fix starts there. `writer`: the one thread every call on the
    output goes through (the caller's checkpoint after a cancel then waits for a write under way)."""
    loop = asyncio.get_running_loop()
    window: deque[tuple[Chunk, asyncio.Task[Embeddings]]] = deque()
    tally = Tally()
    exhausted = False
    failed: InvalidRequest | None = None  # the reader's, raised once the rows before it are written
    last_checkpoint = time.monotonic()
    try:
        while True:
            while not exhausted and len(window) < in_flight:
                try:
                    chunk = await asyncio.to_thread(next, chunks, None)
                except InvalidRequest as exc:
                    failed, chunk = exc, None
                if chunk is None:
                    exhausted = True
                    break
                window.append((chunk, asyncio.create_task(_embed(engine, job, chunk))))
            if not window:
                break
            chunk, task = window[0]
            try:
                result = await task
            except InvalidRequest as exc:
                raise locate(exc, chunk, where) from None
            window.popleft()
            await loop.run_in_executor(writer, output.write, chunk.ids, result.vectors, result.token_counts)
            tally.rows += len(chunk.rows)
            tally.tokens += result.total_tokens
            on_written(len(chunk.rows), result.total_tokens)
            if time.monotonic() - last_checkpoint >= checkpoint_s:
                await loop.run_in_executor(writer, output.checkpoint)
                last_checkpoint = time.monotonic()
    finally:
        for _, task in window:
            task.cancel()
        await asyncio.gather(*(task for _, task in window), return_exceptions=True)
    if failed is not None:
        raise failed
    return tally


async def _embed(engine: Engine, job: Job, chunk: Chunk) -> Embeddings:
    return await engine.embed(
        job.model,
        chunk.texts,
        dimensions=job.dimensions,
        input_type=job.input_type,
        instruction=job.instruction,
    )


def engine_settings(settings: Settings, max_items: int) -> Settings:
    """The command is its engine's only caller and bounds its own work in flight (IN_FLIGHT chunks of
    at most `max_items` inputs), so the guards a server keeps against its clients are lifted: a chunk's
    token total (chunks are sized by --batch-tokens) and the queue's wait and depth."""
    return settings.model_copy(
        update={
            "max_tokens_per_request": 1 << 62,
            "max_queue_wait": float("inf"),
            "max_queued_inputs": max(settings.max_queued_inputs, IN_FLIGHT * max_items),
        }
    )
