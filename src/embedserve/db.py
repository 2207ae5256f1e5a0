"""The server's database behind one interface: SQLite (WAL, the default, a file in the data dir) or
PostgreSQL (by URL, for replicas sharing keys and ledger; the `postgres` extra). SQL is written once with
`?` placeholders; the schema (migrations.py) is created on first use, an older one migrated in place.
Blocking."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

from embedserve.errors import ConfigError, DatabaseUnavailable, ServiceUnavailable
from embedserve.migrations import SCHEMA_VERSION, migrate

Dialect = Literal["sqlite", "postgresql"]
BUSY_TIMEOUT_S = 30.0  # how long a SQLite connection waits for another one's lock
SQLITE_FILE = "embedserve.db"
_PG_SCHEMA_LOCK = 0x656D6265  # pg_advisory_xact_lock key: replicas starting together create it once


class Cursor(Protocol):
    """What a transaction offers: statements with `?` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """-> the rows changed, all statements together."""
        ...

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


class Database(Protocol):
    dialect: Dialect
    where: str  # for messages: the SQLite path or the PostgreSQL host/db (never the password)

    def transaction(self, write: bool = True) -> AbstractContextManager[Cursor]:
        """Commits when the block ends without an exception, rolls back otherwise."""
        ...

    def close(self) -> None: ...


def _unavailable(where: str, exc: Exception) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"The database ({where}) is unavailable: {exc}", retry_after_s=5)


def _unreachable(message: str) -> DatabaseUnavailable:
    """At start-up: the database named by the settings cannot be reached, opened or set up (the CLI
    exits 1), as opposed to a setting that is wrong in itself (ConfigError, exit 2)."""
    return DatabaseUnavailable(message, retry_after_s=5)


# ---- SQLite -----------------------------------------------------------------------------------------


class _SqliteCursor:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        return self._conn.executemany(sql, rows).rowcount

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._conn.execute(sql, tuple(params)).fetchall())


class SqliteDatabase:
    """A connection per transaction: cheap for SQLite, safe from any thread, and a long report never
    holds up the ledger's writer (WAL lets readers and one writer work at once)."""

    dialect: Dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the data directory {path.parent}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")  # a committed record survives a power cut too
        except BaseException:  # (a file that is no database fails here: never leak the connection)
            conn.close()
            raise
        return conn

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Cursor]:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise _unavailable(self.where, exc) from None
        try:
            # A writer takes the lock up front (no deadlock upgrading a read lock); readers take none.
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield _SqliteCursor(conn)
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise _unavailable(self.where, exc) from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def create_schema(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.OperationalError as exc:  # cannot open the file, read-only, locked
            raise _unreachable(f"cannot open the database {self.where}: {exc}") from None
        except sqlite3.Error as exc:  # e.g. "file is not a database": the path names the wrong file
            raise ConfigError(f"cannot open the database {self.where}: {exc}") from None
        try:
            self._enter_wal(conn)
            conn.execute("BEGIN IMMEDIATE")  # the schema lock: one process creates or migrates
            migrate(_SqliteCursor(conn), id_column="INTEGER PRIMARY KEY")
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise _unreachable(f"cannot set up the database {self.where}: {exc}") from None
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot set up the database {self.where}: {exc}") from None
        finally:
            conn.close()  # uncommitted work is rolled back

    @staticmethod
    def _enter_wal(conn: sqlite3.Connection) -> None:
        """Switch the file to WAL (persistent: recorded in the file). SQLite answers a switch that races
        another connection's with "database is locked" at once, without calling the busy handler, so
        several processes starting on a new file wait here as the handler would."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        pass


# ---- PostgreSQL -------------------------------------------------------------------------------------


def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class _PgCursor:
    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cursor.execute(_pg_sql(sql), tuple(params))
        return int(self._cursor.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        self._cursor.executemany(_pg_sql(sql), rows)
        return int(self._cursor.rowcount)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(_pg_sql(sql), tuple(params))
        return [tuple(row) for row in self._cursor.fetchall()]


class PostgresDatabase:
    """A small connection pool; each transaction borrows one connection, checked before use so that a
    restarted PostgreSQL costs one failed call at most."""

    dialect: Dialect = "postgresql"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError:  # an optional extra: the default install serves SQLite only
            raise ConfigError(
                "--database-url names a PostgreSQL database, whose driver is not installed: "
                "pip install 'embedserve[postgres]'"
            ) from None

        self._errors: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError)
        try:
            info = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"--database-url is not a PostgreSQL URL: {exc}") from None
        self.where = (
            f"postgresql://{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        )
        self._url = url
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=4,
            open=False,
            timeout=10,
            check=ConnectionPool.check_connection,
            name="embedserve",
        )

    def open(self) -> None:
        """Connect once directly first: a wrong URL, password or port fails at once with the driver's
        own reason, instead of after the pool's timeout."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            psycopg.connect(self._url, connect_timeout=10).close()
            self._pool.open(wait=True, timeout=10)
        except (psycopg.Error, PoolTimeout) as exc:
            self._pool.close()
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise _unreachable(f"cannot connect to the database {self.where}: {reason}") from None

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Cursor]:
        from psycopg_pool import PoolTimeout

        errors: tuple[type[Exception], ...] = (*self._errors, PoolTimeout)
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
                yield _PgCursor(cursor)
        except errors as exc:
            raise _unavailable(self.where, exc) from None

    def create_schema(self) -> None:
        try:
            with self.transaction() as tx:
                tx.execute(f"SELECT pg_advisory_xact_lock({_PG_SCHEMA_LOCK})")
                migrate(tx, id_column="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
        except ServiceUnavailable as exc:
            raise _unreachable(f"cannot set up the database {self.where}: {exc.message}") from None

    def close(self) -> None:
        self._pool.close()


def open_database(url: str | None, data_dir: Path) -> SqliteDatabase | PostgresDatabase:
    """`url`: None (SQLite in the data dir), `sqlite:///PATH` or `postgresql://...`. Creates the
    schema when it is missing. Raises DatabaseUnavailable when the database cannot be reached, opened
    or set up, ConfigError when the settings name no usable database (bad URL, wrong schema version)."""
    database: SqliteDatabase | PostgresDatabase
    if url is None or not url.strip():
        database = SqliteDatabase(data_dir / SQLITE_FILE)
    elif url.startswith("sqlite:///"):  # SQLAlchemy's spelling: sqlite:///relative, sqlite:////absolute
        database = SqliteDatabase(Path(url.removeprefix("sqlite:///")))
    elif url.startswith(("postgresql://", "postgres://")):
        database = PostgresDatabase(url)
        database.open()
    else:
        raise ConfigError(
            f"--database-url must start with postgresql:// or sqlite:/// (got {url.split(':', 1)[0]!r})"
        )
    try:
        database.create_schema()
        check_schema_version(database)
    except BaseException:
        database.close()
        raise
    return database


def check_schema_version(db: Database) -> None:
    with db.transaction(write=False) as tx:
        rows = tx.fetchall("SELECT schema_version FROM embedserve_meta WHERE id = 1")
    if rows and rows[0][0] != SCHEMA_VERSION:
        raise ConfigError(
            f"the database {db.where} has schema version {rows[0][0]}; this embedserve "
            f"reads version {SCHEMA_VERSION}"
        )
