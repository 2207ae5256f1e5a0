"""`--batch-executor ray`: each batch a Ray Data job on the cluster (`RayBatchExecutor`). The server writes
the job's plan (and stages the input where the store is not the files dir), starts a detached actor
named after the batch, and commits each shard the job writes; a restarted server finds the actor by
name and waits for it, or, if it is gone, resubmits the ranges that have no shard (design note 55)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from embedserve.batches.execute import Ran, RenderError, failed, grouped
from embedserve.batches.executor import read_lines
from embedserve.batches.lines import RequestLine
from embedserve.batches.records import BatchRecord
from embedserve.catalog import Catalog
from embedserve.cluster import batch_shards as store
from embedserve.cluster.batch_actors import BatchDriver
from embedserve.cluster.connect import connect, require_ray
from embedserve.errors import EmbedServeError
from embedserve.files.store import FileStore
from embedserve.settings import Settings
from embedserve.types import Principal

log = logging.getLogger("embedserve.batches")

NAMESPACE = "embedserve"
#: How long one wait on the job lasts: the runner looks at the batch's status (a cancel) this often.
WAIT_S = 1.0


def driver_name(batch_id: str) -> str:
    """The batch's job on the cluster: one per batch, found by this name after a restart."""
    return f"embedserve-batch-{batch_id}"


class RayBatchExecutor:
    """The server's side of a batch on Ray: it computes nothing, it hands the job over and reads back the
    shards; the runner commits them. Joins the cluster (`--ray-address`) on the first batch."""

    def __init__(
        self, settings: Settings, files: FileStore, catalog: Catalog, render_error: RenderError
    ) -> None:
        require_ray()  # a server told to use Ray without it fails at start, not at its first batch
        self._settings = settings
        self._files = files
        self._catalog = catalog
        self._render_error = render_error
        self._root = settings.batch_store or str(settings.files_path / "ray-batches")
        self._connected = False
        self._started_ray = False

    def _where(self, batch_id: str) -> str:
        return store.batch_dir(self._root, batch_id)

    async def _connect(self) -> None:
        if not self._connected:
            self._started_ray = await asyncio.to_thread(connect, self._settings.ray_address)
            self._connected = True

    # ---- on the cluster (blocking) ----------------------------------------------------------------

    def _driver(self, batch_id: str) -> Any | None:
        ray = require_ray()
        try:
            return ray.get_actor(driver_name(batch_id), namespace=NAMESPACE)
        except ValueError:
            return None

    def _submit(self, batch: BatchRecord, ranges: dict[int, list[RequestLine]], principal: Principal) -> Any:
        """The plan of `ranges` in the store (the input staged there first unless the store is the files
        dir), then the batch's driver, detached: it runs on whether or not this server does."""
        ray = require_ray()
        where = self._where(batch.id)
        input_path = str(self._files.path(batch.input_file_id))
        input_uri = input_path
        if self._settings.batch_store is not None:
            input_uri = f"{where}/{store.INPUT}"
            store.stage(input_path, input_uri)
        store.write_plan(where, input_uri, ranges)
        log.info("batch %s: %d line ranges handed to Ray", batch.id, len(ranges))
        return (
            ray.remote(BatchDriver)
            .options(
                name=driver_name(batch.id),
                namespace=NAMESPACE,
                lifetime="detached",
                num_cpus=0,
                max_concurrency=4,  # `wait` beside the constructor's thread
            )
            .remote(where, self._settings, principal, self._render_error, self._settings.replicas)
        )

    def _kill(self, batch_id: str) -> None:
        ray = require_ray()
        driver = self._driver(batch_id)
        if driver is not None:
            ray.kill(driver, no_restart=True)

    # ---- the executor -------------------------------------------------------------------------------

    async def _refused(
        self, batch: BatchRecord, pending: Sequence[RequestLine], principal: EmbedServeError
    ) -> list[Ran]:
        """The owner's key was revoked or has expired: each line fails as its own request would, here."""
        raws = await asyncio.to_thread(read_lines, self._files.path(batch.input_file_id), pending)
        groups, done = grouped(pending, raws, self._settings, self._render_error)
        return done + [failed(line, principal, self._render_error) for group in groups for line, _ in group]

    async def run(
        self,
        batch: BatchRecord,
        pending: Sequence[RequestLine],
        principal: Principal | EmbedServeError,
        go: Callable[[], bool],
    ) -> AsyncGenerator[list[Ran], None]:
        if isinstance(principal, EmbedServeError):
            yield await self._refused(batch, pending, principal)
            return
        ray = require_ray()
        await self._connect()
        where = self._where(batch.id)
        todo = store.by_range(pending)
        driver = await asyncio.to_thread(self._driver, batch.id)
        seen, ended = 0, False
        while todo:
            # Shards first, whoever wrote them (this job, or one before a restart): each is a commit.
            for k, uri in sorted((await asyncio.to_thread(store.shards, where)).items()):
                try:
                    lines = await asyncio.to_thread(store.read_shard, uri)
                except Exception as exc:  # torn by a crash of its node: its lines run again
                    log.warning("batch %s: dropping the unreadable shard %s: %s", batch.id, uri, exc)
                else:
                    yield lines  # the runner has committed them when this resumes
                await asyncio.to_thread(store.remove, uri)
                todo.pop(k, None)
                if not go():
                    return
            if not todo or ended:
                # Lines an ended job left pending (a model that would not load) go to a job of their
                # own at the runner's next step.
                return
            if driver is None:
                driver = await asyncio.to_thread(self._submit, batch, todo, principal)
                seen = 0
            assert driver is not None
            try:
                seen, ended, error = await driver.wait.remote(seen, WAIT_S)
            except ray.exceptions.RayError as exc:  # the job is gone (its node, or someone killed it)
                # The runner's next step resubmits the ranges left (after its pause, should a job die
                # at once each time: no loop of resubmissions).
                log.warning("batch %s: its job on Ray is gone (%s)", batch.id, exc)
                return
            if ended:  # its last shards are read at the top
                if error is not None:
                    log.warning("batch %s: its job on Ray failed: %s", batch.id, error)
                await asyncio.to_thread(self._kill, batch.id)
                driver = None
                continue
            yield []  # nothing new: the runner looks at the batch's status meanwhile
            if not go():
                return

    async def end(self, batch_id: str) -> None:
        if self._settings.ray_address is not None or self._connected:
            await self._connect()
            await asyncio.to_thread(self._kill, batch_id)
        await asyncio.to_thread(store.remove, self._where(batch_id))

    async def close(self) -> None:
        """The jobs go on without this server (SIGTERM included); only a Ray it started itself stops."""
        if self._started_ray:
            await asyncio.to_thread(require_ray().shutdown)
            self._started_ray = False
        self._connected = False
