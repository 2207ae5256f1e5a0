"""KeyStore: managed keys in the database (create, list, show, update, revoke; the pepper check), used by
the CLI and the admin routes, and read whole by the key ring."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from embedserve.db import Cursor, Database
from embedserve.errors import ConfigError, KeyNotFound, MissingParameter
from embedserve.keys.records import UNSET, KeyChanges, KeyRecord
from embedserve.keys.secret import PREFIX_CHARS, generate_key, key_digest, pepper_check

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
    a counter that running servers poll, so it reaches them within the key ring's REFRESH_INTERVAL_S."""

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
