"""A gate on a live server's forward passes, so that a test decides when a batch may run (it then runs
for real), or makes them fail: `Gate.backends` is a backend factory whose backends' passes (`encode`,
what the batcher runs; `forward` too where it goes through it) go through it (the `gate` fixture in
tests/conftest.py gives a fresh one)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from embedserve.backends.base import Backend
from embedserve.backends.factory import BackendFactory, make_backend
from embedserve.settings import Settings
from embedserve.spec import ModelSpec
from embedserve.types import PassOutputs, TokenBatch

GUARD_S = 60
#: One forward pass at a time, so that a batch held at the gate holds the model and what comes next
#: stays queued (a second worker would take it).
ONE = {"model_workers": 1}


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Until `condition` holds, at most GUARD_S seconds (then the test fails saying `what`)."""
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


async def until(condition: Callable[[], bool], what: str) -> None:
    """wait_until on an event loop: the loop keeps running while the test waits."""
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


class Gate:
    """Holds every forward pass (after the load's warm-up and calibration) until opened; records the
    id rows that reached the model."""

    def __init__(self) -> None:
        self.armed = False
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.seen: list[list[int]] = []
        #: Raised by every forward pass while set (a fault of the model's: CUDA errors, a bug).
        self.failure: Exception | None = None

    def wrap(self, encode: Callable[..., PassOutputs]) -> Callable[..., PassOutputs]:
        def gated(batch: TokenBatch, *, tokens: bool) -> PassOutputs:
            if self.armed:
                self.seen.extend(
                    [int(i) for i, m in zip(row, mask, strict=True) if m]
                    for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True)
                )
                self.entered.set()
                assert self.opened.wait(GUARD_S), "the test never opened the gate"
            if self.failure is not None:
                raise self.failure
            return encode(batch, tokens=tokens)

        return gated

    def backends(self, inner: BackendFactory = make_backend) -> BackendFactory:
        """A factory of `inner`'s backends with their passes behind this gate."""

        def make(spec: ModelSpec, settings: Settings) -> Backend:
            backend = inner(spec, settings)
            backend.encode = self.wrap(backend.encode)  # type: ignore[method-assign]
            return backend

        return make
