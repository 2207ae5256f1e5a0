"""The checks a server makes before it binds or starts replicas: every tiktoken file a model reads is on
disk, the database opens (schema created or migrated), the pepper matches its keys, the journal can be
written. Run once, in the process that starts the server(s), so a misconfiguration fails there."""

from __future__ import annotations

from dataclasses import dataclass

from embedserve.catalog import Catalog
from embedserve.errors import ConfigError
from embedserve.settings import Settings


def check_tiktoken(settings: Settings, catalog: Catalog) -> None:
    """Every tiktoken encoding a model reads is on disk (never downloaded)."""
    from embedserve.tiktoken_ids import locate

    for spec in catalog.specs:
        if (name := settings.tiktoken_for(spec.tiktoken_ids)) is not None:
            try:
                locate(name, settings.tiktoken_file)
            except ConfigError as exc:
                raise ConfigError(f"model '{spec.id}': {exc.message}") from None


@dataclass(frozen=True, slots=True)
class Store:
    pepper: bytes  # the setting's, else the data dir's file (created by the check if missing)
    managed_keys: int  # keys in the key store, revoked ones included (any makes the server closed)


def check_store(settings: Settings) -> Store:
    """The database opens (schema created or migrated), the pepper matches its keys and the usage journal
    can be written."""
    from embedserve.db import open_database
    from embedserve.journal import UsageJournal
    from embedserve.keys.secret import load_pepper
    from embedserve.keys.store import KeyStore

    UsageJournal(settings.usage_journal_path).check()
    db = open_database(settings.database_url, settings.data_dir)
    try:
        pepper = load_pepper(settings.key_pepper, settings.data_dir)
        store = KeyStore(db)
        store.check_pepper(pepper)
        managed = len(store.list_keys())
    finally:
        db.close()
    return Store(pepper=pepper, managed_keys=managed)
