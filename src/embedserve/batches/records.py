"""A batch as the database keeps it (`BatchRecord`), its statuses, and its wire shape: OpenAI's `Batch`
object, every field of it (`batch_json`). Pure."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
#: A batch in one of these still has work (or its files) to finish: the runner takes it up.
UNFINISHED: tuple[BatchStatus, ...] = ("validating", "in_progress", "finalizing", "cancelling")
ENDED: tuple[BatchStatus, ...] = ("failed", "completed", "expired", "cancelled")
ENDPOINT = "/v1/embeddings"  # the one endpoint a batch's lines may call
COMPLETION_WINDOW = "24h"  # the one window OpenAI accepts (its length: --batch-window)
#: The `Batch` fields that are unix seconds (int), None until the batch reaches them.
TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def new_batch_id() -> str:
    """batch_ + the time in nanoseconds + 64 random bits, hex: id order is creation order (lists)."""
    return f"batch_{time.time_ns():016x}{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class BatchError:
    """One validation error of the input file (`line`: 1-based, None for the file as a whole)."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    owner: str  # the key id that created it
    status: BatchStatus
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: Mapping[str, str] | None
    created_at: int
    expires_at: int
    model: str | None = None
    errors: tuple[BatchError, ...] = ()
    #: Chosen when the lines start; shown only once the file is registered (the batch has ended).
    output_file_id: str | None = None
    error_file_id: str | None = None
    output_bytes: int = 0  # what of each file is committed: a longer file holds a write not committed
    error_bytes: int = 0
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    queued_tokens: int = 0
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


def batch_json(batch: BatchRecord) -> dict[str, Any]:
    """OpenAI's `Batch` object. The output and error files show once they are registered, at the end."""
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": (
            None
            if not batch.errors
            else {
                "object": "list",
                "data": [
                    {"code": e.code, "message": e.message, "param": e.param, "line": e.line}
                    for e in batch.errors
                ],
            }
        ),
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id if batch.ended and batch.output_bytes else None,
        "error_file_id": batch.error_file_id if batch.ended and batch.error_bytes else None,
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "expires_at": batch.expires_at,
        "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at,
        "failed_at": batch.failed_at,
        "expired_at": batch.expired_at,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "usage": {
            "input_tokens": batch.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": batch.input_tokens,
        },
        "metadata": dict(batch.metadata) if batch.metadata is not None else None,
        "model": batch.model,
    }
