"""KeyRing: the server's in-memory view of every key it accepts (the static ones from the settings and a
snapshot of the key table), reloaded through one path, that authenticates a request without the database."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from embedserve.errors import AuthenticationFailed
from embedserve.health import Health
from embedserve.keys.records import KeyRecord
from embedserve.keys.secret import key_digest
from embedserve.keys.store import KeyStore
from embedserve.timestamps import iso
from embedserve.types import ANONYMOUS, Principal

log = logging.getLogger("embedserve.keys")

REFRESH_INTERVAL_S = 0.5  # how often a server looks for key changes (revocation lands within a second)


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
    key table that `refresh_sync()` reloads when the table's change counter moves. A request costs one
    HMAC and one dict lookup (the digest, not the key, is compared); never a database query."""

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

    def _load(self, version: int, rows: Sequence[tuple[bytes, KeyRecord]]) -> None:
        self._managed = {
            digest: _Entry(record.principal(), record.expires_at, record.revoked_at is not None)
            for digest, record in rows
        }
        self._any_managed = bool(rows)
        self.version = version

    def refresh_sync(self) -> bool:
        """Blocking: reload the snapshot when the change counter moved -> whether it did. The one reload
        path: start-up, the poller (`run`) and the admin routes' changes all come through here."""
        changed = self._store.version() != self.version
        if changed:
            self._load(*self._store.snapshot())
        if self.health.succeeded(self._clock()):
            log.info("the key store is reachable again")
        return changed

    async def run(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        """Refresh every interval until cancelled. A database outage keeps the last snapshot."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if await asyncio.to_thread(self.refresh_sync):
                    log.info(
                        "API keys reloaded (version %d, %d managed keys)", self.version, len(self._managed)
                    )
            except Exception as exc:
                if self.health.failed():
                    log.error("cannot refresh API keys, serving the last snapshot: %s", exc)

    def principal_of(self, key_id: str) -> Principal:
        """The key of this id as it stands now (a batch runs on its owner's account long after the
        request that created it): AuthenticationFailed once it is unknown, revoked or expired."""
        if key_id == ANONYMOUS.key_id and self.open:
            return ANONYMOUS
        for entry in (*self._static.values(), *self._managed.values()):
            if entry.principal.key_id == key_id:
                return self._check(entry)
        raise AuthenticationFailed(f"The API key {key_id} that created this batch is unknown.")

    def _check(self, entry: _Entry) -> Principal:
        if entry.revoked:
            raise AuthenticationFailed(f"The API key {entry.principal.prefix}... has been revoked.")
        if entry.expires_at is not None and entry.expires_at <= self._clock():
            raise AuthenticationFailed(
                f"The API key {entry.principal.prefix}... expired at {iso(entry.expires_at)}."
            )
        return entry.principal

    def authenticate(self, key: str) -> Principal:
        """The presented Bearer key -> its Principal, or AuthenticationFailed."""
        if self.open:
            return ANONYMOUS
        digest = key_digest(self._pepper, key)
        entry = self._static.get(digest) or self._managed.get(digest)
        if entry is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return self._check(entry)
