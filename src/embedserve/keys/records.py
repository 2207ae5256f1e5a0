"""A managed key as stored (KeyRecord), its one JSON shape, and changes to it (KeyChanges), parsed from
the fields the admin routes and the CLI give, each bad value a 400 naming it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

from embedserve.errors import InvalidRequest, InvalidType, MissingParameter
from embedserve.timestamps import iso, parse_time
from embedserve.types import Principal


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A managed key as stored, minus its hash."""

    id: str
    name: str
    prefix: str
    models: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    expires_at: float | None
    admin: bool
    created_at: float
    revoked_at: float | None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def principal(self) -> Principal:
        return Principal(
            key_id=self.id,
            name=self.name,
            prefix=self.prefix,
            models=None if self.models is None else frozenset(self.models),
            rpm=self.rpm,
            tpm=self.tpm,
            admin=self.admin,
        )


def key_json(record: KeyRecord, *, now: float | None = None) -> dict[str, Any]:
    """The one JSON shape of a key (CLI --json and the admin routes)."""
    return {
        "id": record.id,
        "object": "api_key",
        "name": record.name,
        "prefix": record.prefix,
        "models": None if record.models is None else list(record.models),
        "rpm": record.rpm,
        "tpm": record.tpm,
        "expires_at": iso(record.expires_at),
        "admin": record.admin,
        "created_at": iso(record.created_at),
        "revoked_at": iso(record.revoked_at),
        "status": record.status(time.time() if now is None else now),
    }


class Unset(enum.Enum):
    UNSET = "unset"


UNSET = Unset.UNSET


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """An update: fields left UNSET stay as they are; None clears the model list, a limit or the
    expiry."""

    name: str | Unset = UNSET
    models: tuple[str, ...] | Unset | None = UNSET
    rpm: int | Unset | None = UNSET
    tpm: int | Unset | None = UNSET
    expires_at: float | Unset | None = UNSET
    admin: bool | Unset = UNSET

    def apply(self, record: KeyRecord) -> KeyRecord:
        return KeyRecord(
            id=record.id,
            prefix=record.prefix,
            created_at=record.created_at,
            revoked_at=record.revoked_at,
            name=record.name if self.name is UNSET else self.name,
            models=record.models if self.models is UNSET else self.models,
            rpm=record.rpm if self.rpm is UNSET else self.rpm,
            tpm=record.tpm if self.tpm is UNSET else self.tpm,
            expires_at=record.expires_at if self.expires_at is UNSET else self.expires_at,
            admin=record.admin if self.admin is UNSET else self.admin,
        )


KEY_FIELDS = ("name", "models", "rpm", "tpm", "expires_at", "admin")


def parse_key_fields(payload: object, *, creating: bool) -> KeyChanges:
    """A JSON object of key fields (POST/PATCH /v1/keys; the CLI builds the same) -> KeyChanges, or a
    400 naming the field. `name` is required when creating; absent fields stay as they are."""
    if not isinstance(payload, dict):
        raise InvalidType("The request body must be a JSON object.")
    unknown = sorted(set(payload) - set(KEY_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"Unknown field '{unknown[0]}'; a key has {', '.join(KEY_FIELDS)}.", param=unknown[0]
        )
    changes: dict[str, Any] = {}
    if "name" in payload or creating:
        name = payload.get("name")
        if name is None:
            raise MissingParameter("A key needs a 'name'.", param="name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise InvalidType("'name' must be a non-empty string of at most 200 characters.", param="name")
        changes["name"] = name.strip()
    if "models" in payload:
        models = payload["models"]
        if models is not None and (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and m.strip() for m in models)
        ):
            raise InvalidType(
                "'models' must be null (every model) or a non-empty array of model ids or aliases.",
                param="models",
            )
        changes["models"] = None if models is None else tuple(dict.fromkeys(m.strip() for m in models))
    for limit in ("rpm", "tpm"):
        if limit in payload:
            value = payload[limit]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1
            ):
                raise InvalidType(f"'{limit}' must be null (unlimited) or a positive integer.", param=limit)
            changes[limit] = value
    if "expires_at" in payload:
        value = payload["expires_at"]
        changes["expires_at"] = None if value is None else parse_time(value, "expires_at", relative=True)
    if "admin" in payload:
        if not isinstance(payload["admin"], bool):
            raise InvalidType("'admin' must be true or false.", param="admin")
        changes["admin"] = payload["admin"]
    return KeyChanges(**changes)
