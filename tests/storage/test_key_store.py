"""The key store and the server's key ring on a real database, SQLite and PostgreSQL alike: keys are kept
only as peppered digests, every change moves the change counter the servers poll, revoked and expired
keys are refused with their reason, and a different pepper is caught instead of failing every key."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from conftest import Storage
from embedserve.db import open_database
from embedserve.errors import AuthenticationFailed, ConfigError, DatabaseUnavailable, KeyNotFound
from embedserve.keys import KeyChanges, KeyRing, KeyStore, key_digest, key_json
from embedserve.types import ANONYMOUS

PEPPER = b"test-pepper"


def test_a_created_key_is_stored_only_as_its_peppered_digest(storage: Storage) -> None:
    db = storage.open()
    try:
        store = KeyStore(db)
        record, secret = store.create(
            PEPPER, KeyChanges(name="team-a", models=("m1",), rpm=10, tpm=1000, admin=False)
        )
        with db.transaction(write=False) as tx:
            rows = tx.fetchall("SELECT * FROM api_keys")
        assert len(rows) == 1
        assert secret not in repr(rows)
        assert secret[8:] not in repr(rows)  # not even the secret part after the listed prefix
        assert key_digest(PEPPER, secret).hex() in repr(rows)
        assert record.prefix == secret[:8]
        assert store.get(record.id) == record
        assert store.list_keys() == [record]
    finally:
        db.close()


def test_every_change_moves_the_counter_and_updates_apply_only_given_fields(storage: Storage) -> None:
    db = storage.open()
    try:
        store = KeyStore(db)
        versions = [store.version()]
        record, _ = store.create(PEPPER, KeyChanges(name="a", rpm=5, expires_at=2e9))
        versions.append(store.version())
        updated = store.update(record.id, KeyChanges(tpm=100, models=("x", "y")))
        versions.append(store.version())
        assert (updated.name, updated.rpm, updated.tpm, updated.models, updated.expires_at) == (
            "a",
            5,
            100,
            ("x", "y"),
            2e9,
        )
        cleared = store.update(record.id, KeyChanges(rpm=None, models=None, expires_at=None, admin=True))
        versions.append(store.version())
        assert (cleared.rpm, cleared.models, cleared.expires_at, cleared.admin) == (None, None, None, True)
        revoked = store.revoke(record.id)
        versions.append(store.version())
        assert revoked.revoked_at is not None
        assert key_json(revoked)["status"] == "revoked"
        assert store.revoke(record.id).revoked_at == revoked.revoked_at  # twice is harmless
        assert versions == sorted(set(versions)) and len(versions) == 5
        with pytest.raises(KeyNotFound):
            store.update("key_nope", KeyChanges(rpm=1))
        with pytest.raises(KeyNotFound):
            store.revoke("key_nope")
    finally:
        db.close()


def test_the_ring_accepts_live_keys_and_refuses_revoked_and_expired_ones_with_the_reason(
    storage: Storage,
) -> None:
    db = storage.open()
    try:
        store = KeyStore(db)
        ring = KeyRing(store, PEPPER, api_keys=["static-1"], admin_keys=["admin-1"])
        live, live_secret = store.create(PEPPER, KeyChanges(name="live", models=("m1",), rpm=3))
        gone, gone_secret = store.create(PEPPER, KeyChanges(name="gone"))
        _, old_secret = store.create(PEPPER, KeyChanges(name="old", expires_at=time.time() - 1))
        store.revoke(gone.id)
        assert ring.refresh_sync() is True
        assert ring.refresh_sync() is False  # nothing changed: no reload
        principal = ring.authenticate(live_secret)
        assert (principal.key_id, principal.name, principal.prefix, principal.rpm) == (
            live.id,
            "live",
            live.prefix,
            3,
        )
        assert principal.models == frozenset({"m1"}) and not principal.admin
        with pytest.raises(AuthenticationFailed, match="revoked"):
            ring.authenticate(gone_secret)
        with pytest.raises(AuthenticationFailed, match="expired"):
            ring.authenticate(old_secret)
        with pytest.raises(AuthenticationFailed, match="Incorrect"):
            ring.authenticate(live_secret + "x")
        static, admin = ring.authenticate("static-1"), ring.authenticate("admin-1")
        assert not static.admin and not static.limited and static.models is None
        assert admin.admin and admin.key_id.startswith("admin-key-")
        assert "static-1" not in static.key_id
    finally:
        db.close()


def test_the_server_is_open_only_while_no_key_of_any_kind_ever_existed(storage: Storage) -> None:
    db = storage.open()
    try:
        store = KeyStore(db)
        ring = KeyRing(store, PEPPER)
        ring.refresh_sync()
        assert ring.open and ring.authenticate("anything") is ANONYMOUS
        assert not ANONYMOUS.admin  # an open server's callers cannot manage keys
        record, _ = store.create(PEPPER, KeyChanges(name="first"))
        ring.refresh_sync()
        assert not ring.open
        store.revoke(record.id)
        ring.refresh_sync()
        assert not ring.open, "revoking the last key must not open the server"
        assert not KeyRing(store, PEPPER, api_keys=["k"]).open
    finally:
        db.close()


def test_a_change_reaches_a_running_ring_within_a_second(storage: Storage) -> None:
    db = storage.open()
    try:
        store = KeyStore(db)
        record, secret = store.create(PEPPER, KeyChanges(name="soon-revoked"))
        ring = KeyRing(store, PEPPER)
        ring.refresh_sync()

        async def scenario() -> float:
            task = asyncio.create_task(ring.run())
            try:
                ring.authenticate(secret)
                await asyncio.to_thread(store.revoke, record.id)
                revoked_at = time.monotonic()
                while True:
                    try:
                        ring.authenticate(secret)
                    except AuthenticationFailed:
                        return time.monotonic() - revoked_at
                    await asyncio.sleep(0.02)
            finally:
                task.cancel()

        assert asyncio.run(asyncio.wait_for(scenario(), 5)) < 1.0
    finally:
        db.close()


def test_a_different_pepper_is_refused_once_keys_exist(storage: Storage) -> None:
    db = storage.open()
    try:
        store = KeyStore(db)
        store.check_pepper(PEPPER)
        store.check_pepper(PEPPER)
        store.create(PEPPER, KeyChanges(name="a"))
        with pytest.raises(ConfigError, match="another key pepper"):
            store.check_pepper(b"another")
        with pytest.raises(ConfigError):
            store.create(b"another", KeyChanges(name="b"))
        assert len(store.list_keys()) == 1
    finally:
        db.close()


def _open_at_once(url: str | None, data_dir: Path, openers: int = 4) -> list[BaseException]:
    """What `openers` servers or CLIs starting together on one database raise."""
    errors: list[BaseException] = []

    def open_and_close() -> None:
        try:
            open_database(url, data_dir).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_the_schema_is_created_once_even_by_several_processes_at_once(storage: Storage) -> None:
    assert _open_at_once(storage.url, storage.data_dir) == []
    db = storage.open()
    try:
        assert KeyStore(db).version() == 0
    finally:
        db.close()


def test_an_unknown_database_url_is_a_config_error_and_an_unreachable_one_database_unavailable(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="postgresql://"):
        open_database("mysql://somewhere/db", tmp_path)
    with pytest.raises(DatabaseUnavailable, match="cannot connect"):  # the CLI exits 1, not 2
        open_database("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", tmp_path)


def test_servers_starting_together_on_a_new_sqlite_file_all_start(tmp_path: Path) -> None:
    """SQLite refuses a WAL switch that races another connection's at once ("database is locked",
    no busy handler): about one round in fifteen of four openers hit it before the retry."""
    for round_ in range(40):
        assert _open_at_once(None, tmp_path / f"round-{round_}") == [], f"round {round_}"
