"""AppState: everything a running app owns (settings, model registry, database, key ring, rate limiter,
usage ledger, service, metrics, the draining flag and the background tasks), opened in the lifespan and
reachable from handlers as `request.app.state.embedserve`. No module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from embedserve.backends.memory import trim
from embedserve.catalog import Catalog
from embedserve.db import Database, open_database
from embedserve.keys import KeyRing, KeyStore, load_pepper
from embedserve.metrics import Metrics
from embedserve.ratelimit import RateLimiter
from embedserve.runtime import ModelRegistry
from embedserve.service import EmbeddingService
from embedserve.settings import Settings
from embedserve.usage import UsageLedger

log = logging.getLogger("embedserve.app")


@dataclass(slots=True)
class AppState:
    settings: Settings
    registry: ModelRegistry
    db: Database
    key_store: KeyStore
    keys: KeyRing
    limiter: RateLimiter
    ledger: UsageLedger
    service: EmbeddingService
    metrics: Metrics
    #: Set on SIGTERM: /ready answers 503 and new requests are turned away while in-flight ones finish.
    draining: bool = False
    #: Requests being served (probes and /metrics excluded); `idle` is set whenever it is 0.
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: A heap trim is running (after a large request; one at a time), and whether another large
    #: request finished meanwhile (its pages may have been freed after the running trim passed them).
    trimming: bool = False
    trim_again: bool = False

    def __post_init__(self) -> None:
        self.idle.set()
        self.metrics.in_flight.set_function(lambda: self.in_flight)

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
    async def open(cls, settings: Settings, catalog: Catalog) -> AppState:
        """Open the database (creating the schema), check the pepper, load the keys: a server never
        answers a request before it knows every key."""
        db = await asyncio.to_thread(open_database, settings.database_url, settings.data_dir)
        try:
            pepper = await asyncio.to_thread(load_pepper, settings.key_pepper, settings.data_dir)
            if db.dialect == "postgresql" and not settings.key_pepper:
                log.warning("the key pepper comes from %s: every replica and CLI sharing %s needs the "
                            "same one (set EMBEDSERVE_KEY_PEPPER)", settings.data_dir / "key-pepper",
                            db.where)
            store = KeyStore(db)
            await asyncio.to_thread(store.check_pepper, pepper)
            keys = KeyRing(store, pepper, api_keys=settings.api_keys, admin_keys=settings.admin_keys)
            await asyncio.to_thread(keys.refresh_sync)
        except BaseException:
            await asyncio.to_thread(db.close)
            raise
        metrics = Metrics()
        registry = ModelRegistry(catalog, settings, metrics)
        limiter = RateLimiter()
        ledger = UsageLedger(db, settings.usage_flush_interval)
        return cls(settings=settings, registry=registry, db=db, key_store=store, keys=keys,
                   limiter=limiter, ledger=ledger, metrics=metrics,
                   service=EmbeddingService(registry, settings, metrics, limiter, ledger))

    def start(self) -> None:
        self.tasks += [asyncio.create_task(self.keys.run(), name="refresh-keys"),
                       asyncio.create_task(self.ledger.run(), name="flush-usage")]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.registry.close()
        await self.ledger.close()  # after the last request: every record is written
        await asyncio.to_thread(self.db.close)
