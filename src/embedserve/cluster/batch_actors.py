"""What runs on the cluster for a batch: `BatchDriver`, a detached actor that outlives the server and drives
the batch's Ray Data pipeline (its plan's ranges -> `LineEmbedder` actors, each holding an engine ->
one shard per range), and answers how far it has got."""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from embedserve.batches.execute import Ran, RenderError, grouped, run_group
from embedserve.batches.lines import RequestLine
from embedserve.cluster.batch_shards import read_lines, read_plan, write_shard
from embedserve.engine import Engine, catalog_of
from embedserve.settings import Settings
from embedserve.types import Principal

log = logging.getLogger("embedserve.cluster")

#: Each embedder's share: one CPU, one forward pass at a time on one thread (on CPU, several
#: single-threaded passes side by side are the fast way: design note 28); more actors for more cores.
EMBEDDER_CPUS = 1


class LineEmbedder:
    """A Ray Data actor: one engine (its own event loop, in a thread), and for each range it is given,
    the range's lines read from the input, run as the server would run them, written as one shard."""

    def __init__(
        self, settings: Settings, principal: Principal, render_error: RenderError, where: str, input_uri: str
    ) -> None:
        self._settings = settings
        self._principal = principal
        self._render_error = render_error
        self._where = where
        self._input = input_uri
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="embedserve-engine", daemon=True).start()
        self._engine = Engine(settings, catalog_of(settings))
        self._call(self._engine.__aenter__())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _run(self, lines: list[RequestLine], raws: list[bytes]) -> list[Ran]:
        groups, done = grouped(lines, raws, self._settings, self._render_error)
        results = await asyncio.gather(
            *(run_group(self._engine, group, self._principal, self._render_error) for group in groups)
        )
        for ran in results:
            done += ran
        return done

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
        ranges, counts = [], []
        for k, spec in zip(batch["range"], batch["lines"], strict=True):
            lines = [RequestLine(*row) for row in orjson.loads(bytes(spec))]
            raws = read_lines(self._input, lines)
            done = self._call(self._run(lines, raws))
            write_shard(self._where, int(k), done)
            ranges.append(int(k))
            counts.append(len(done))
        return {"range": ranges, "lines": counts}


class BatchDriver:
    """A detached, named actor per batch (`cluster.batch_job` names it): its pipeline starts with it, in a
    thread, so it needs no call from the server that made it, which may be gone by the time it ends."""

    def __init__(
        self, where: str, settings: Settings, principal: Principal, render_error: RenderError, actors: int
    ) -> None:
        self._changed = threading.Condition()
        self._done = 0
        self._finished = False
        self._error: str | None = None
        args = (where, settings, principal, render_error, actors)
        threading.Thread(target=self._drive, args=args, name="batch-driver", daemon=True).start()

    def _drive(
        self, where: str, settings: Settings, principal: Principal, render_error: RenderError, actors: int
    ) -> None:
        data_api = importlib.import_module("ray.data")  # the extra, as connect.require_ray takes it
        # Progress bars would go to the log of whichever server is connected: its shards say as much.
        data_api.DataContext.get_current().enable_progress_bars = False
        try:
            input_uri, ranges = read_plan(where)
            items = [
                {
                    "range": k,
                    "lines": orjson.dumps(
                        [[r.line, r.custom_id, r.offset, r.length, r.inputs, r.token_bound] for r in lines]
                    ),
                }
                for k, lines in ranges
            ]
            data = data_api.from_items(items).map_batches(
                LineEmbedder,
                fn_constructor_kwargs={
                    "settings": settings.model_copy(update={"cpu_cores": EMBEDDER_CPUS, "model_workers": 1}),
                    "principal": principal,
                    "render_error": render_error,
                    "where": where,
                    "input_uri": input_uri,
                },
                batch_size=1,
                concurrency=actors,
                num_cpus=EMBEDDER_CPUS,
            )
            for _ in data.iter_rows():
                with self._changed:
                    self._done += 1
                    self._changed.notify_all()
        except Exception as exc:
            log.exception("the batch job at %s failed", where)
            self._error = f"{type(exc).__name__}: {exc}"
        with self._changed:
            self._finished = True
            self._changed.notify_all()

    def wait(self, seen: int, timeout_s: float) -> tuple[int, bool, str | None]:
        """Until more than `seen` ranges are done, or the job has ended, or `timeout_s`. -> (ranges done,
        whether the job has ended, its error)."""
        with self._changed:
            self._changed.wait_for(lambda: self._done > seen or self._finished, timeout_s)
            return self._done, self._finished, self._error
