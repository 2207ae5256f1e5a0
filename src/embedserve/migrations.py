"""The database's schema and its numbered migrations: what a new database is created with, and the steps
that bring one of each older version to the next, applied in order at start (in the caller's transaction,
which holds the schema lock, so replicas starting together migrate once). Pure SQL, both dialects."""

from __future__ import annotations

import re
from typing import Any, Protocol

SCHEMA_VERSION = 3  # 2: usage_records.record_id (design note 35); 3: files and batches (note 47)

#: The latest schema, created whole on a new database (`{id_column}`: the dialect's identity column).
TABLES = (
    """
CREATE TABLE IF NOT EXISTS embedserve_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    schema_version INTEGER NOT NULL,
    keys_version BIGINT NOT NULL,          -- bumped by every change to api_keys: servers poll it
    pepper_check TEXT                      -- HMAC(pepper, constant): catches a pepper that differs
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,                  -- the first characters of the key, for listings and logs
    key_hash TEXT NOT NULL UNIQUE,         -- hex HMAC-SHA256(pepper, key), never the key
    models TEXT,                           -- JSON array of model names, NULL for every model
    rpm INTEGER,
    tpm INTEGER,
    expires_at DOUBLE PRECISION,           -- unix seconds, NULL for never
    admin INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS usage_records (
    id {id_column},
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    inputs INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,  -- unix seconds, when the response was ready
    latency_ms DOUBLE PRECISION NOT NULL,
    price_per_million DOUBLE PRECISION NOT NULL,  -- the model's price when it was used
    record_id TEXT,                        -- made by the server, unique; NULL only in rows from version 1
    batch_id TEXT                          -- the batch a line of which this was; NULL online
);
CREATE INDEX IF NOT EXISTS usage_records_created_at ON usage_records (created_at);
CREATE INDEX IF NOT EXISTS usage_records_key_created_at ON usage_records (key_id, created_at);
"""
    + """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,                   -- file-<time-ordered hex>: newest first is id order
    owner TEXT NOT NULL,                   -- the key id that uploaded it (or owns the batch it came of)
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,                 -- batch (uploaded), batch_output (a batch's output or errors)
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,            -- unix seconds
    expires_at BIGINT                      -- unix seconds, NULL for never
);
CREATE INDEX IF NOT EXISTS files_owner_id ON files (owner, id);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,                   -- batch_<time-ordered hex>
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,                         -- JSON object, NULL for none
    model TEXT,                            -- the model of its lines, once validated
    errors TEXT,                           -- JSON array of validation errors, NULL for none
    output_file_id TEXT,                   -- chosen at start, shown once the file is registered
    error_file_id TEXT,
    output_bytes BIGINT NOT NULL,          -- committed length of the output file: beyond is a torn write
    error_bytes BIGINT NOT NULL,
    total INTEGER NOT NULL,
    completed INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    input_tokens BIGINT NOT NULL,
    queued_tokens BIGINT NOT NULL,         -- upper bound of the tokens still to embed (per-key limit)
    created_at BIGINT NOT NULL,
    in_progress_at BIGINT,
    expires_at BIGINT NOT NULL,
    finalizing_at BIGINT,
    completed_at BIGINT,
    failed_at BIGINT,
    expired_at BIGINT,
    cancelling_at BIGINT,
    cancelled_at BIGINT
);
CREATE INDEX IF NOT EXISTS batches_owner_id ON batches (owner, id);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
CREATE TABLE IF NOT EXISTS batch_requests (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,                 -- 1-based line of the input file
    custom_id TEXT NOT NULL,
    byte_offset BIGINT NOT NULL,           -- where the line starts in the input file
    byte_length INTEGER NOT NULL,
    inputs INTEGER NOT NULL,
    token_bound BIGINT NOT NULL,           -- most tokens its inputs can make (the per-key batch limit)
    state TEXT NOT NULL,                   -- pending | completed | failed
    PRIMARY KEY (batch_id, line)
);
INSERT INTO embedserve_meta (id, schema_version, keys_version) VALUES (1, {version}, 0)
    ON CONFLICT (id) DO NOTHING;
"""
)

#: Version -> the statements that bring a database of that version to the next. Tables new in a version
#: are in TABLES (created if missing before the steps run); a step changes what already existed.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE usage_records ADD COLUMN record_id TEXT",),
    2: ("ALTER TABLE usage_records ADD COLUMN batch_id TEXT",),
}
#: Created once the tables have their latest columns: a replayed or retried record is written once at
#: most; a batch's usage is found by its id.
INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS usage_records_record_id ON usage_records (record_id)",
    "CREATE INDEX IF NOT EXISTS usage_records_batch_id ON usage_records (batch_id)",
)


class Statements(Protocol):
    def execute(self, sql: str, params: Any = ()) -> int: ...

    def fetchall(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]: ...


def statements(script: str) -> list[str]:
    return [s for s in re.sub(r"--[^\n]*", "", script).split(";") if s.strip()]


def migrate(tx: Statements, id_column: str) -> int:
    """Create what is missing, then run each numbered step from the database's version to ours. A newer
    schema is left alone (db.check_schema_version refuses it). -> the version found."""
    for statement in statements(TABLES.format(id_column=id_column, version=SCHEMA_VERSION)):
        tx.execute(statement)
    ((version,),) = tx.fetchall("SELECT schema_version FROM embedserve_meta WHERE id = 1")
    if version > SCHEMA_VERSION:
        return int(version)
    for step in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[step]:
            tx.execute(statement)
    for statement in INDEXES:
        tx.execute(statement)
    if version != SCHEMA_VERSION:
        tx.execute("UPDATE embedserve_meta SET schema_version = ? WHERE id = 1", (SCHEMA_VERSION,))
    return int(version)
