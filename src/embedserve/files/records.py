"""A stored file as the database keeps it (FileRecord), its one JSON shape (OpenAI's FileObject), its id,
and the pure parsing of what a caller gives: an upload's purpose and expiry, a listing's query."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from embedserve.errors import InvalidRequest, MissingParameter

#: What a caller may upload a file for; the batch worker registers its outputs as `batch_output`.
UPLOAD_PURPOSES = ("batch",)
OUTPUT_PURPOSE = "batch_output"
#: A listing's page: OpenAI's range and default.
MAX_LIST_LIMIT = 10_000
#: OpenAI's bounds of an upload's `expires_after[seconds]` (1 hour to 30 days).
MIN_EXPIRES_AFTER_S, MAX_EXPIRES_AFTER_S = 3600, 30 * 86400
_FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
_DIGITS = re.compile(r"^[0-9]{1,12}$")  # ASCII only: str.isdigit takes "²", which int() refuses

Order = Literal["asc", "desc"]


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A file's metadata; its bytes are at FileStore.path(id)."""

    id: str
    owner: str  # the key id that uploaded it, or that owns the batch it came of
    filename: str
    purpose: str
    bytes: int
    created_at: int  # unix seconds
    expires_at: int | None  # unix seconds, None for never


@dataclass(frozen=True, slots=True)
class ListQuery:
    """`GET /v1/files`: newest first by default; `after` is the last id of the previous page."""

    after: str | None = None
    limit: int = MAX_LIST_LIMIT
    order: Order = "desc"
    purpose: str | None = None


def new_file_id() -> str:
    """ "file-" and 32 hex digits: the time in nanoseconds, then 64 random bits. Ids sort as the files were
    made, so a listing's order and its `after` cursor are plain id comparisons."""
    return f"file-{time.time_ns():016x}{secrets.token_hex(8)}"


def is_file_id(text: str) -> bool:
    """The shape new_file_id makes (anything else names no file, and never a path)."""
    return _FILE_ID.match(text) is not None


def file_json(record: FileRecord) -> dict[str, Any]:
    """OpenAI's FileObject. `status` and `status_details` are deprecated there; a stored file is
    `processed`."""
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "expires_at": record.expires_at,
        "status": "processed",
        "status_details": None,
    }


def deleted_json(record: FileRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "file", "deleted": True}


def check_purpose(purpose: str | None) -> str:
    if purpose is None:
        raise MissingParameter("An upload needs a 'purpose' field ('batch').", param="purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"'{purpose[:64]}' is not a purpose this server takes files for: it takes "
            + ", ".join(f"'{p}'" for p in UPLOAD_PURPOSES)
            + ".",
            param="purpose",
        )
    return purpose


def parse_expires_after(anchor: str | None, seconds: str | None) -> int | None:
    """`expires_after[anchor]` and `expires_after[seconds]` of an upload form (both or neither) -> the
    seconds, or None for the server's default."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest(
            "expires_after[anchor] must be 'created_at' (with expires_after[seconds]).",
            param="expires_after.anchor",
        )
    if seconds is None or not _DIGITS.match(seconds.strip()):
        raise InvalidRequest(
            "expires_after[seconds] must be a whole number of seconds.", param="expires_after.seconds"
        )
    value = int(seconds)
    if not MIN_EXPIRES_AFTER_S <= value <= MAX_EXPIRES_AFTER_S:
        raise InvalidRequest(
            f"expires_after[seconds] must be from {MIN_EXPIRES_AFTER_S} (1 hour) to "
            f"{MAX_EXPIRES_AFTER_S} (30 days); got {value}.",
            param="expires_after.seconds",
        )
    return value


def parse_list_query(query: Mapping[str, str]) -> ListQuery:
    """The query string of `GET /v1/files`; unknown parameters are ignored, as OpenAI does."""
    limit = query.get("limit")
    if limit is not None and not (_DIGITS.match(limit) and 1 <= int(limit) <= MAX_LIST_LIMIT):
        raise InvalidRequest(
            f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}; got '{limit[:32]}'.", param="limit"
        )
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be 'asc' or 'desc'; got '{order[:32]}'.", param="order")
    return ListQuery(
        after=query.get("after") or None,
        limit=MAX_LIST_LIMIT if limit is None else int(limit),
        order="asc" if order == "asc" else "desc",
        purpose=query.get("purpose") or None,
    )
