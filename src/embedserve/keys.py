"""API keys: generation (`es-` + 43 random characters), hashing with a server-side pepper
(HMAC-SHA256; the key itself is never stored), the KeyStore in the database (create, list, update,
revoke, used by the CLI and the admin routes), and the KeyRing: the server's in-memory snapshot of every
key, refreshed in the background, that authenticates a request without touching the database."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from embedserve.db import Cursor, Database
from embedserve.errors import (
    AuthenticationFailed,
    ConfigError,
    InvalidRequest,
    InvalidType,
    KeyNotFound,
    MissingParameter,
)
from embedserve.health import Health
from embedserve.timestamps import iso, parse_time
from embedserve.types import ANONYMOUS, Principal

log = logging.getLogger("embedserve.keys")

KEY_PREFIX = "es-"
PREFIX_CHARS = 8  # shown in listings and logs: "es-" + the first 5 random characters
PEPPER_FILE = "key-pepper"
REFRESH_INTERVAL_S = 0.5  # how often a server looks for key changes (revocation lands within a second)
_PEPPER_CHECK = b"embedserve pepper check v1"


def generate_key() -> str:
    """A new secret: `es-` + 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(pepper: bytes, key: str) -> bytes:
    """HMAC-SHA256(pepper, key): what is stored and looked up. Without the pepper, a stolen database
    gives nothing to test guesses against."""
    return hmac.new(pepper, key.encode("utf-8"), hashlib.sha256).digest()


def pepper_check(pepper: bytes) -> str:
    return hmac.new(pepper, _PEPPER_CHECK, hashlib.sha256).hexdigest()


def load_pepper(configured: str | None, data_dir: Path) -> bytes:
    """The setting's pepper, else the one in `<data-dir>/key-pepper`, created (mode 0600) on first use."""
    if configured:
        return configured.encode("utf-8")
    path = data_dir / PEPPER_FILE
    if not path.exists():
        try:
            _create_pepper(path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        except OSError as exc:
            raise ConfigError(f"cannot create the key pepper file {path}: {exc}") from None
        else:
            log.info(
                "created the key pepper %s (keep it with the database: keys cannot be checked without it)",
                path,
            )
    try:
        pepper = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the key pepper file {path}: {exc}") from None
    if not pepper:
        raise ConfigError(f"the key pepper file {path} is empty")
    if path.stat().st_mode & 0o077:
        log.warning("the key pepper file %s is readable by others; chmod 600 it", path)
    return pepper


def _create_pepper(path: Path) -> None:
    """Written in full to a private temporary file, then linked into place: a process starting at the
    same moment sees either no pepper or the whole one, never a half-written file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_hex(32).encode("ascii") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # fails with FileExistsError if another process won
    finally:
        tmp.unlink(missing_ok=True)


# ---- records ------------------------------------------------------------------------------------------


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


# ---- the store ----------------------------------------------------------------------------------------

_COLUMNS = "id, name, prefix, models, rpm, tpm, expires_at, admin, created_at, revoked_at"


def _record(row: Sequence[Any]) -> KeyRecord:
    ident, name, prefix, models, rpm, tpm, expires_at, admin, created_at, revoked_at = row
    return KeyRecord(
        id=ident,
        name=name,
        prefix=prefix,
        models=None if models is None else tuple(json.loads(models)),
        rpm=rpm,
        tpm=tpm,
        expires_at=expires_at,
        admin=bool(admin),
        created_at=float(created_at),
        revoked_at=revoked_at,
    )


def _bump(tx: Cursor) -> None:
    tx.execute("UPDATE embedserve_meta SET keys_version = keys_version + 1 WHERE id = 1")


class KeyStore:
    """Managed keys in the database. Blocking (run it in a thread from async code). Every change bumps
    a counter that running servers poll, so it reaches them within REFRESH_INTERVAL_S."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    def check_pepper(self, pepper: bytes) -> None:
        """Every process that hashes keys must use the same pepper; the first one to come records a
        check value, later ones compare. A mismatch with keys in the database stops them."""
        check = pepper_check(pepper)
        with self._db.transaction() as tx:
            ((stored,),) = tx.fetchall("SELECT pepper_check FROM embedserve_meta WHERE id = 1")
            if stored == check:
                return
            ((count,),) = tx.fetchall("SELECT COUNT(*) FROM api_keys")
            if stored is not None and (count or self._db.dialect == "postgresql"):
                raise ConfigError(
                    f"the keys in {self._db.where} were hashed with another key pepper; give every "
                    "server and CLI that uses this database the same --key-pepper "
                    "(EMBEDSERVE_KEY_PEPPER) or pepper file"
                )
            tx.execute("UPDATE embedserve_meta SET pepper_check = ? WHERE id = 1", (check,))

    def create(self, pepper: bytes, fields: KeyChanges) -> tuple[KeyRecord, str]:
        """-> (the record, the secret). The secret exists only in the return value."""
        if fields.name is UNSET:
            raise MissingParameter("A key needs a 'name'.", param="name")
        self.check_pepper(pepper)
        secret = generate_key()
        blank = KeyRecord(
            id="key_" + secrets.token_hex(6),
            name="",
            prefix=secret[:PREFIX_CHARS],
            models=None,
            rpm=None,
            tpm=None,
            expires_at=None,
            admin=False,
            created_at=self._clock(),
            revoked_at=None,
        )
        record = fields.apply(blank)
        with self._db.transaction() as tx:
            tx.execute(
                f"INSERT INTO api_keys ({_COLUMNS}, key_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.name,
                    record.prefix,
                    None if record.models is None else json.dumps(list(record.models)),
                    record.rpm,
                    record.tpm,
                    record.expires_at,
                    int(record.admin),
                    record.created_at,
                    None,
                    key_digest(pepper, secret).hex(),
                ),
            )
            _bump(tx)
        return record, secret

    def list_keys(self) -> list[KeyRecord]:
        with self._db.transaction(write=False) as tx:
            rows = tx.fetchall(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id")
        return [_record(row) for row in rows]

    def get(self, key_id: str) -> KeyRecord:
        with self._db.transaction(write=False) as tx:
            return self._get(tx, key_id)

    def _get(self, tx: Cursor, key_id: str) -> KeyRecord:
        rows = tx.fetchall(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        if not rows:
            raise KeyNotFound(f"No API key with id '{key_id}'.", param="id")
        return _record(rows[0])

    def update(self, key_id: str, changes: KeyChanges) -> KeyRecord:
        with self._db.transaction() as tx:
            record = changes.apply(self._get(tx, key_id))
            tx.execute(
                "UPDATE api_keys SET name = ?, models = ?, rpm = ?, tpm = ?, expires_at = ?, "
                "admin = ? WHERE id = ?",
                (
                    record.name,
                    None if record.models is None else json.dumps(list(record.models)),
                    record.rpm,
                    record.tpm,
                    record.expires_at,
                    int(record.admin),
                    key_id,
                ),
            )
            _bump(tx)
        return record

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoked keys stay in the table (their usage keeps its name); revoking twice is harmless."""
        with self._db.transaction() as tx:
            record = self._get(tx, key_id)
            if record.revoked_at is None:
                record = replace(record, revoked_at=self._clock())
                tx.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (record.revoked_at, key_id))
                _bump(tx)
        return record

    def version(self) -> int:
        with self._db.transaction(write=False) as tx:
            ((version,),) = tx.fetchall("SELECT keys_version FROM embedserve_meta WHERE id = 1")
        return int(version)

    def snapshot(self) -> tuple[int, list[tuple[bytes, KeyRecord]]]:
        """(version, every key with its digest). The version is read first: a change that lands in
        between shows up as a newer version at the next poll."""
        with self._db.transaction(write=False) as tx:
            ((version,),) = tx.fetchall("SELECT keys_version FROM embedserve_meta WHERE id = 1")
            rows = tx.fetchall(f"SELECT {_COLUMNS}, key_hash FROM api_keys")
        return int(version), [(bytes.fromhex(row[-1]), _record(row[:-1])) for row in rows]


# ---- the server's view --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal
    expires_at: float | None = None
    revoked: bool = False


def static_principal(pepper: bytes, key: str, *, admin: bool) -> tuple[bytes, Principal]:
    """A key given with --api-key / --admin-key: unlimited, every model. Its id comes from the peppered
    digest, so it is stable across restarts and says nothing about the key."""
    digest = key_digest(pepper, key)
    kind = "admin-key" if admin else "api-key"
    return digest, Principal(key_id=f"{kind}-{digest.hex()[:12]}", name=f"--{kind}", admin=admin)


class KeyRing:
    """Every key the server accepts, by digest: the static ones from the settings and a snapshot of the
    key table that `run()` refreshes when the table's change counter moves. A request costs one HMAC and
    one dict lookup (the digest, not the key, is compared); never a database query."""

    def __init__(
        self,
        store: KeyStore,
        pepper: bytes,
        *,
        api_keys: Iterable[str] = (),
        admin_keys: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._pepper = pepper
        self._clock = clock
        self._static: dict[bytes, _Entry] = {}
        for keys, admin in ((api_keys, False), (admin_keys, True)):
            for key in keys:
                digest, principal = static_principal(pepper, key, admin=admin)
                self._static[digest] = _Entry(principal)
        self._managed: Mapping[bytes, _Entry] = {}
        self._any_managed = False
        self.version = -1
        self.health = Health()  # of the refreshes: a success is a poll that reached the key store

    @property
    def open(self) -> bool:
        """Open (no key needed) only while no key of any kind exists: once a key has been created, even
        a revoked one, the server never falls back to open."""
        return not self._static and not self._any_managed

    @property
    def pepper(self) -> bytes:
        return self._pepper

    @property
    def managed_count(self) -> int:
        return len(self._managed)

    def load(self, version: int, rows: Sequence[tuple[bytes, KeyRecord]]) -> None:
        self._managed = {
            digest: _Entry(record.principal(), record.expires_at, record.revoked_at is not None)
            for digest, record in rows
        }
        self._any_managed = bool(rows)
        self.version = version

    def refresh_sync(self) -> bool:
        """Blocking: reload the snapshot when the counter moved. -> whether it did."""
        changed = self._store.version() != self.version
        if changed:
            self.load(*self._store.snapshot())
        self.health.succeeded(self._clock())
        return changed

    async def run(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        """Poll the change counter until cancelled. A database outage keeps the last snapshot."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                version = await asyncio.to_thread(self._store.version)
                if version != self.version:
                    self.load(*await asyncio.to_thread(self._store.snapshot))
                    log.info(
                        "API keys reloaded (version %d, %d managed keys)", self.version, len(self._managed)
                    )
            except Exception as exc:
                if self.health.failed():
                    log.error("cannot refresh API keys, serving the last snapshot: %s", exc)
            else:
                if self.health.succeeded(self._clock()):
                    log.info("the key store is reachable again")

    def authenticate(self, key: str) -> Principal:
        """The presented Bearer key -> its Principal, or AuthenticationFailed."""
        if self.open:
            return ANONYMOUS
        digest = key_digest(self._pepper, key)
        entry = self._static.get(digest) or self._managed.get(digest)
        if entry is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if entry.revoked:
            raise AuthenticationFailed(f"The API key {entry.principal.prefix}... has been revoked.")
        if entry.expires_at is not None and entry.expires_at <= self._clock():
            raise AuthenticationFailed(
                f"The API key {entry.principal.prefix}... expired at {iso(entry.expires_at)}."
            )
        return entry.principal
