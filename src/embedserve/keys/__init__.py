"""API keys: secrets and digests (`secret`), records and their changes (`records`), the store in the
database (`store`), and the server's live key ring (`ring`). The public names are re-exported here."""

from embedserve.keys.records import (
    KEY_FIELDS,
    UNSET,
    KeyChanges,
    KeyRecord,
    Unset,
    key_json,
    parse_key_fields,
)
from embedserve.keys.ring import REFRESH_INTERVAL_S, KeyRing, static_principal
from embedserve.keys.secret import (
    KEY_PREFIX,
    PEPPER_FILE,
    PREFIX_CHARS,
    generate_key,
    key_digest,
    load_pepper,
)
from embedserve.keys.store import KeyStore

__all__ = [
    "KEY_FIELDS",
    "KEY_PREFIX",
    "PEPPER_FILE",
    "PREFIX_CHARS",
    "REFRESH_INTERVAL_S",
    "UNSET",
    "KeyChanges",
    "KeyRecord",
    "KeyRing",
    "KeyStore",
    "Unset",
    "generate_key",
    "key_digest",
    "key_json",
    "load_pepper",
    "parse_key_fields",
    "static_principal",
]
