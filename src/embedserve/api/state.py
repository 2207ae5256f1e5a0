"""AppState: everything a running app owns (the engine, the database, key ring, rate limiter, usage
ledger, file store, metrics, the draining flag and the background tasks), opened in the lifespan;
`app_state` is the one way to reach it. No module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from embedserve.api.errors import batch_line_error
from embedserve.backends.factory import BackendFactory
from embedserve.backends.memory import trim
from embedserve.batches.executor import BatchExecutor, LocalExecutor
from embedserve.batches.runner import BatchRunner
from embedserve.batches.store import BatchStore
from embedserve.batches.sweeper import sweep_forever
from embedserve.catalog import Catalog
from embedserve.db import Database, open_database
from embedserve.engine import Engine
from embedserve.files import FileStore
from embedserve.journal import UsageJournal
from embedserve.keys.ring import KeyRing
from embedserve.keys.secret import load_pepper
from embedserve.keys.store import KeyStore
from embedserve.metered import MeteredEmbeddings
from embedserve.metrics import Metrics
from embedserve.ratelimit import RateLimiter, open_limiter
from embedserve.settings import Settings
from embedserve.timestamps import iso
from embedserve.usage import UsageLedger, replay_journal

log = logging.getLogger("embedserve.app")


@dataclass(slots=True)
class AppState:
    settings: Settings
    engine: Engine
    db: Database
    key_store: KeyStore
    keys: KeyRing
    limiter: RateLimiter
    ledger: UsageLedger
    embeddings: MeteredEmbeddings
    metrics: Metrics
    files: FileStore
    batch_store: BatchStore
    batches: BatchRunner
    #: When the drain began (monotonic seconds), None while serving; see `draining`.
    drain_started: float | None = None
    #: Requests being served (probes and /metrics excluded); `idle` is set whenever it is 0.
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: The batch runner's task: stopped first at shutdown, so that its lines in flight are committed.
    runner: asyncio.Task[None] | None = None
    #: A heap trim is running (after a large request; one at a time), and whether another large
    #: request finished meanwhile (its pages may have been freed after the running trim passed them).
    trimming: bool = False
    trim_again: bool = False

    def __post_init__(self) -> None:
        self.idle.set()
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.metrics.track_health(
            lambda: self.ledger.pending, ledger=self.ledger.health, keys=self.keys.health
        )

    @property
    def draining(self) -> bool:
        """Set on SIGTERM: /ready answers 503 and new requests are turned away while in-flight ones
        finish. The first set starts the shutdown's clock (`close`)."""
        return self.drain_started is not None

    @draining.setter
    def draining(self, value: bool) -> None:
        if not value:
            self.drain_started = None
        elif self.drain_started is None:
            self.drain_started = time.monotonic()

    def checks(self) -> dict[str, Any]:
        """The health detail of /health and /ready: the ledger's writes and the key ring's refreshes."""
        ledger, keys = self.ledger.health, self.keys.health
        return {
            "ledger": {
                "status": ledger.status,
                "pending_records": self.ledger.pending,
                "write_failures": ledger.failures,
                "last_write": iso(ledger.last_success),
            },
            "keys": {
                "status": keys.status,
                "refresh_failures": keys.failures,
                "last_refresh": iso(keys.last_success),
            },
        }

    async def drain(self, grace: float) -> None:
        """Turn new requests away and wait for those in flight, at most `grace` seconds (the uvicorn
        server on SIGTERM, a Ray Serve replica being stopped). The batch runner takes no new line from
        now on (`close` waits for those in flight)."""
        self.draining = True
        self.batches.stop()
        try:
            await asyncio.wait_for(self.idle.wait(), grace)
        except TimeoutError:
            log.warning("grace period over with %d request(s) still in flight", self.in_flight)

    def request_started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    def after_large_body(self) -> None:
        """A request with a large body is done: give the heap pages its parsed input held back to the
        system (glibc keeps freed pages of many small strings resident; 16 requests of 3 MB at once
        left the process ~100 MiB larger for good). In a thread, at most one at a time."""
        if self.trimming:
            self.trim_again = True
            return
        self.trimming, self.trim_again = True, False

        def trimmed(_: object) -> None:
            self.trimming = False
            if self.trim_again:
                self.after_large_body()

        asyncio.get_running_loop().run_in_executor(None, trim).add_done_callback(trimmed)

    @classmethod
    async def open(cls, settings: Settings, catalog: Catalog, backends: BackendFactory) -> AppState:
        """Open the database (creating or migrating the schema), check the pepper, load the keys, replay
        the usage journal: a server never answers a request before it knows every key, and a usage
        report never misses what the last shutdown journaled. The engine's models load after (`start`)."""
        db = await asyncio.to_thread(open_database, settings.database_url, settings.data_dir)
        journal = UsageJournal(settings.usage_journal_path)
        metrics = Metrics()
        try:
            pepper = await asyncio.to_thread(load_pepper, settings.key_pepper, settings.data_dir)
            if db.dialect == "postgresql" and not settings.key_pepper:
                log.warning(
                    "the key pepper comes from %s: every replica and CLI sharing %s needs the "
                    "same one (set EMBEDSERVE_KEY_PEPPER)",
                    settings.data_dir / "key-pepper",
                    db.where,
                )
            store = KeyStore(db)
            await asyncio.to_thread(store.check_pepper, pepper)
            keys = KeyRing(store, pepper, api_keys=settings.api_keys, admin_keys=settings.admin_keys)
            await asyncio.to_thread(keys.refresh_sync)
            await asyncio.to_thread(journal.check)
            await asyncio.to_thread(replay_journal, db, journal)
            files = await asyncio.to_thread(
                FileStore,
                db,
                settings.files_path,
                max_bytes=settings.max_file_bytes,
                min_free=settings.files_min_free,
                expiry_s=settings.file_expiry,
            )
            limiter = await open_limiter(settings, on_store_error=metrics.rate_limit_store_errors.inc)
        except BaseException:
            await asyncio.to_thread(db.close)
            raise
        engine = Engine(settings, catalog, backends=backends, metrics=metrics)
        ledger = UsageLedger(db, settings.usage_flush_interval, journal)
        batch_store = BatchStore(db)
        runner = BatchRunner(
            batch_store,
            files,
            engine,
            settings,
            principal_of=keys.principal_of,
            executor=batch_executor(settings, files, engine),
        )
        return cls(
            settings=settings,
            engine=engine,
            db=db,
            key_store=store,
            keys=keys,
            limiter=limiter,
            ledger=ledger,
            metrics=metrics,
            embeddings=MeteredEmbeddings(engine, limiter, ledger, metrics),
            files=files,
            batch_store=batch_store,
            batches=runner,
        )

    def start(self) -> None:
        """Begin loading the models, refreshing the keys and flushing the ledger, in the background."""
        self.engine.start()
        settings = self.settings
        self.tasks += [
            asyncio.create_task(self.keys.run(), name="refresh-keys"),
            asyncio.create_task(self.ledger.run(), name="flush-usage"),
            asyncio.create_task(
                sweep_forever(
                    self.files,
                    self.batch_store,
                    interval_s=settings.sweep_interval,
                    keep_s=settings.file_expiry,
                ),
                name="sweep",
            ),
        ]
        self.runner = asyncio.create_task(self.batches.run(), name="run-batches")

    async def close(self) -> int:
        """-> the usage records lost (0 unless the database and the journal both failed). The ledger
        gets until `shutdown_grace` after the drain began (after now without a drain): the whole
        shutdown stays within the one grace a supervisor is told about (design note 35)."""
        began = time.monotonic() if self.drain_started is None else self.drain_started
        deadline = began + self.settings.shutdown_grace
        if self.runner is not None:  # its lines in the engine finish and are committed; the rest resume
            self.batches.stop()
            await asyncio.wait([self.runner], timeout=max(0.0, deadline - time.monotonic()))
            self.tasks.append(self.runner)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.engine.close(grace=max(0.0, deadline - time.monotonic()))
        # After the last request: every record it made is pending.
        lost = await self.ledger.close(deadline=deadline)
        await self.limiter.close()
        await asyncio.to_thread(self.db.close)
        return lost


def batch_executor(settings: Settings, files: FileStore, engine: Engine) -> BatchExecutor:
    """Where batches run (--batch-executor): this server's idle capacity, or a Ray cluster (the `ray`
    extra, imported only then)."""
    if settings.batch_executor == "ray":
        from embedserve.cluster.batch_job import RayBatchExecutor

        return RayBatchExecutor(settings, files, engine.catalog, batch_line_error)
    return LocalExecutor(files, engine, settings, batch_line_error)


def app_state(app: object) -> AppState:
    """The state of a running app (its lifespan opened it): the one way handlers, middleware and the
    server reach it. LookupError before the lifespan has opened it."""
    state = getattr(getattr(app, "state", None), "embedserve", None)
    if not isinstance(state, AppState):
        raise LookupError("the app's state is not open (its lifespan has not started)")
    return state
