"""A gate on a live server's forward passes, so that a test decides when a batch may run (it then runs
for real): the `gate` fixture (tests/conftest.py) wraps the real backend's forward in one."""

from __future__ import annotations

import threading
from collections.abc import Callable

from embedserve.types import FloatMatrix, TokenBatch

GUARD_S = 60
#: One forward pass at a time, so that a batch held at the gate holds the model and what comes next
#: stays queued (a second worker would take it).
ONE = {"model_workers": 1}


class Gate:
    """Holds every forward pass (after the load's warm-up and calibration) until opened; records the
    id rows that reached the model."""

    def __init__(self) -> None:
        self.armed = False
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.seen: list[list[int]] = []

    def wrap(self, forward: Callable[[TokenBatch], FloatMatrix]) -> Callable[[TokenBatch], FloatMatrix]:
        def gated(batch: TokenBatch) -> FloatMatrix:
            if self.armed:
                self.seen.extend(
                    [int(i) for i, m in zip(row, mask, strict=True) if m]
                    for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True)
                )
                self.entered.set()
                assert self.opened.wait(GUARD_S), "the test never opened the gate"
            return forward(batch)

        return gated
