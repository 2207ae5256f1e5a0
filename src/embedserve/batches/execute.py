"""A batch's lines through an engine: each line's body read as its own request would be (`grouped`), lines
of one kind as one engine call (`run_group`), and what each line came to (`Ran`: its output or error line
and what it cost). Both executors run this, in the server or in a Ray actor, so their lines are alike."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from embedserve.batches.lines import GROUP_INPUTS, RequestLine, kind_of, line_job, merged, output_line, part
from embedserve.engine import Engine
from embedserve.errors import EmbedServeError, ServiceUnavailable
from embedserve.protocol import render_embeddings
from embedserve.settings import Settings
from embedserve.types import EmbeddingJob, EmbeddingResult, Principal

#: (the error, the line's request id) -> the status and body its own POST /v1/embeddings would answer.
RenderError = Callable[[EmbedServeError, str], tuple[int, bytes]]
#: Lines of one kind, each with its request as the route reads it.
Group = list[tuple[RequestLine, EmbeddingJob]]


@dataclass(frozen=True, slots=True)
class Ran:
    """A line that ran: `ok` (its `text` goes to the output file, and it is billed) or not (the error
    file). `model` is the catalog id that embedded it; the runner prices and bills it."""

    line: int
    ok: bool
    text: bytes  # the output or error line, newline included
    tokens: int = 0
    inputs: int = 0
    model: str | None = None
    request_id: str = ""
    created_at: float = 0.0
    latency_ms: float = 0.0


def failed(line: RequestLine, exc: EmbedServeError, render_error: RenderError) -> Ran:
    request_id = uuid.uuid4().hex
    status, body = render_error(exc, request_id)
    return Ran(line.line, False, output_line(line.custom_id, request_id, status, body), request_id=request_id)


def grouped(
    lines: Sequence[RequestLine], raws: Sequence[bytes], settings: Settings, render_error: RenderError
) -> tuple[list[Group], list[Ran]]:
    """The lines parsed as their requests would be, in runs of one kind of up to GROUP_INPUTS inputs;
    and the lines whose body the route refuses, each its error at once."""
    groups: list[Group] = []
    refused: list[Ran] = []
    for line, raw in zip(lines, raws, strict=True):
        try:
            job = line_job(raw, settings.max_body_bytes, settings.max_inputs_per_request)
        except EmbedServeError as exc:
            refused.append(failed(line, exc, render_error))
            continue
        last = groups[-1] if groups else None
        if (
            last is not None
            and kind_of(last[0][1]) == kind_of(job)
            and sum(j.count for _, j in last) + job.count <= GROUP_INPUTS
        ):
            last.append((line, job))
        else:
            groups.append([(line, job)])
    return groups, refused


def _completed(
    engine: Engine, line: RequestLine, job: EmbeddingJob, result: EmbeddingResult, started: float
) -> Ran:
    request_id = uuid.uuid4().hex
    body = render_embeddings(result, job.model)
    return Ran(
        line.line,
        True,
        output_line(line.custom_id, request_id, 200, body),
        tokens=result.prompt_tokens,
        inputs=len(result.token_counts),
        model=engine.catalog.resolve(result.model_id).id,
        request_id=request_id,
        created_at=time.time(),
        latency_ms=(time.perf_counter() - started) * 1000,
    )


async def _run_one(
    engine: Engine, line: RequestLine, job: EmbeddingJob, principal: Principal, render_error: RenderError
) -> Ran | None:
    """One line alone. A "come back later" (the model loading, the engine closing) leaves it pending."""
    started = time.perf_counter()
    try:
        result = await engine.run(job, principal, work="batch")
    except ServiceUnavailable:
        return None
    except EmbedServeError as exc:
        return failed(line, exc, render_error)
    return _completed(engine, line, job, result, started)


async def run_group(
    engine: Engine, group: Group, principal: Principal | EmbedServeError, render_error: RenderError
) -> list[Ran]:
    """Lines of one kind as one engine call; should any line make it fail, each line runs alone, so
    that each gets exactly the answer its own request would (the index in a message included). The
    lines left out are still pending. `principal` an error: the owner's key was revoked or has expired,
    and each line says so."""
    if isinstance(principal, EmbedServeError):
        return [failed(line, principal, render_error) for line, _ in group]
    started = time.perf_counter()
    if len(group) > 1:
        try:
            result = await engine.run(merged([job for _, job in group]), principal, work="batch")
        except ServiceUnavailable:
            return []  # ShuttingDown included: the lines stay pending for the next run
        except EmbedServeError:
            pass
        else:
            done, at = [], 0
            for line, job in group:
                done.append(_completed(engine, line, job, part(result, at, job.count), started))
                at += job.count
            return done
    alone = await asyncio.gather(
        *(_run_one(engine, line, job, principal, render_error) for line, job in group)
    )
    return [ran for ran in alone if ran is not None]
