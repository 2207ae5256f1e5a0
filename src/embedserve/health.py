"""The health of the server's background work on the database (the usage ledger's writes, the key ring's
refreshes): how often it failed, when it last succeeded, whether it is failing now. Its owner updates it;
/health, /ready and /metrics read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "degraded"]


@dataclass(slots=True)
class Health:
    failures: int = 0
    last_success: float | None = None  # unix seconds
    failing: bool = False

    @property
    def status(self) -> Status:
        return "degraded" if self.failing else "ok"

    def succeeded(self, now: float) -> bool:
        """-> whether this ends a failing streak (worth one log line)."""
        recovered, self.failing, self.last_success = self.failing, False, now
        return recovered

    def failed(self) -> bool:
        """-> whether this starts a failing streak (logged once, not at every retry)."""
        started, self.failing = not self.failing, True
        self.failures += 1
        return started
