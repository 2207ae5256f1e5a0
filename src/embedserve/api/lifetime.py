"""How long a request may live: its work runs until it finishes, the client goes away (then the work is
cancelled, so its queued inputs never reach the model), or the request's deadline passes (503)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request

from embedserve.errors import ClientDisconnected, RequestTimedOut

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already, so the server
    has nothing else to receive on this request)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def timed_out(timeout_s: float) -> RequestTimedOut:
    return RequestTimedOut(
        f"The request did not finish within the server's limit of {timeout_s:g} s; "
        "its work was dropped. Retry, or send fewer inputs per request.",
        retry_after_s=1,
    )


async def before(deadline: float, timeout_s: float, work: Coroutine[Any, Any, T]) -> T:
    """Await `work` (e.g. reading a slowly uploaded body), RequestTimedOut past `deadline`."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
            return await work
    except TimeoutError:
        raise timed_out(timeout_s) from None


async def bounded(request: Request, work: Coroutine[Any, Any, T], *, deadline: float, timeout_s: float) -> T:
    """Await `work` until `deadline` (a time.perf_counter() value). Cancels it when the client
    disconnects (ClientDisconnected) or the deadline passes (RequestTimedOut)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    done: set[asyncio.Future[Any]] = set()
    try:
        done, _ = await asyncio.wait(
            {task, watcher},
            timeout=max(0.0, deadline - time.perf_counter()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # the cancellation drops its queued inputs
        if watcher in done:
            raise ClientDisconnected("The client closed the connection before the answer was ready.")
        raise timed_out(timeout_s)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        # An error raised from the task holds this frame (its traceback), and the frame the task, whose
        # error it is: a cycle that keeps the whole request (its body, its texts) alive until the cyclic
        # collector's rare full pass. 16 refused 3 MB requests held ~100 MiB that way.
        del task, watcher, done
