"""The parameters of `POST /v1/batches` and `GET /v1/batches`, checked before anything is stored: pure,
each refusal a 400 naming its parameter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from embedserve.batches.records import COMPLETION_WINDOW, ENDPOINT
from embedserve.errors import InvalidRequest, InvalidType, MissingParameter

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
LIST_LIMIT = (1, 100, 20)  # GET /v1/batches?limit=: least, most, default


@dataclass(frozen=True, slots=True)
class BatchCreate:
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Mapping[str, str] | None


def _text(payload: Mapping[str, object], name: str) -> str:
    value = payload.get(name)
    if value is None:
        raise MissingParameter(f"Missing required parameter: '{name}'.", param=name)
    if not isinstance(value, str) or not value:
        raise InvalidType(f"'{name}' must be a non-empty string.", param=name)
    return value


def parse_batch_create(payload: object) -> BatchCreate:
    if not isinstance(payload, dict):
        raise InvalidType("The request body must be a JSON object.")
    known = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    input_file_id = _text(payload, "input_file_id")
    endpoint = _text(payload, "endpoint")
    if endpoint != ENDPOINT:
        raise InvalidRequest(
            f"The endpoint {endpoint[:64]!r} is not supported: this server runs batches of {ENDPOINT} only.",
            param="endpoint",
        )
    window = _text(payload, "completion_window")
    if window != COMPLETION_WINDOW:
        raise InvalidRequest(
            f"'completion_window' must be {COMPLETION_WINDOW!r}; got {window[:16]!r}.",
            param="completion_window",
        )
    return BatchCreate(input_file_id, endpoint, window, parse_metadata(payload.get("metadata")))


def parse_metadata(value: object) -> Mapping[str, str] | None:
    """OpenAI's metadata: up to 16 pairs of strings, keys up to 64 characters, values up to 512."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidType("'metadata' must be an object of string values.", param="metadata")
    if len(value) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"'metadata' may hold at most {MAX_METADATA_PAIRS} pairs; got {len(value)}.", param="metadata"
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidType(f"'metadata.{key[:64]}' must be a string.", param="metadata")
        if len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(
                f"'metadata' keys may be at most {MAX_METADATA_KEY} characters.", param="metadata"
            )
        if len(item) > MAX_METADATA_VALUE:
            raise InvalidRequest(
                f"'metadata' values may be at most {MAX_METADATA_VALUE} characters.", param="metadata"
            )
    return dict(value)


def parse_list_params(params: Mapping[str, str]) -> tuple[str | None, int]:
    """`after` (a batch id) and `limit` -> (after, limit)."""
    unknown = sorted(set(params) - {"after", "limit"})
    if unknown:
        raise InvalidRequest(f"Unknown parameter '{unknown[0]}'; expected after, limit.", param=unknown[0])
    least, most, default = LIST_LIMIT
    raw = params.get("limit")
    limit = default
    if raw is not None:
        if not raw.strip().isdigit() or not least <= int(raw) <= most:
            raise InvalidRequest(f"'limit' must be an integer from {least} to {most}.", param="limit")
        limit = int(raw)
    after = params.get("after") or None
    return after, limit
