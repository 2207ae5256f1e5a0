"""The actor of a corpus job on Ray Data: one engine (its threads set to the actor's CPUs), which embeds
the pieces Ray Data hands it, each into its shard, and answers one summary row a piece."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from embedserve.catalog import Catalog
from embedserve.cluster.pieces import Piece, open_filesystem, rows_of
from embedserve.cluster.shards import ShardOutput
from embedserve.corpus.chunks import chunked
from embedserve.corpus.output import RunInfo
from embedserve.corpus.rows import Fields, Source
from embedserve.corpus.run import Job, embed_chunks, engine_settings
from embedserve.engine import Engine
from embedserve.errors import ConfigError, InvalidRequest
from embedserve.settings import Settings
from embedserve.spec import ModelSpec
from embedserve.sync import EngineSync


class PieceEmbedder:
    """Ray Data's callable class (map_batches, a batch of piece descriptions): built once per actor,
    so the model loads once and stays loaded for every piece the actor gets."""

    def __init__(
        self,
        settings: Settings,
        spec: ModelSpec,
        job: Job,
        fields: Fields,
        source: Any,
        out: str,
        batch_tokens: int,
    ) -> None:
        import ray

        self._max_items = settings.max_inputs_per_request
        self._engine = EngineSync(Engine(engine_settings(settings, self._max_items), Catalog([spec])))
        self._job, self._fields, self._batch_tokens = job, fields, batch_tokens
        self._source = source  # the input's pyarrow filesystem (pickled to the actor)
        self._out_fs, self._out = open_filesystem(out)
        self._info = RunInfo(spec.id, job.dimensions or spec.dimensions, job.input_type, job.instruction)
        self._node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        names = ("key", "rows", "tokens", "node", "error", "started", "ended")
        answers: dict[str, list[Any]] = {name: [] for name in names}
        for raw in batch["piece"]:
            piece = Piece.from_json(str(raw))
            started = time.time()  # wall clock: the driver compares the actors' times across nodes
            rows, tokens, error = self._embed(piece)
            values = (piece.key, rows, tokens, self._node, error, started, time.time())
            for name, value in zip(names, values, strict=True):
                answers[name].append(value)
        return answers

    def _embed(self, piece: Piece) -> tuple[int, int, str]:
        """(rows, tokens, "") once the piece's shard is written; a bad record or header -> (0, 0, its
        message) and no shard, so the fixed input's rerun redoes this piece only."""
        output = ShardOutput(
            self._out_fs, self._out, piece.key, self._info, {"piece": piece.key, "node": self._node}
        )
        chunks = chunked(
            rows_of(self._source, piece, self._fields),
            batch_tokens=self._batch_tokens,
            max_items=self._max_items,
        )
        source = Source(Path(piece.name), "row" if piece.format == "parquet" else "line")
        try:
            tally = self._engine.run(
                embed_chunks(
                    self._engine.engine,
                    self._job,
                    chunks,
                    output,
                    where=source.where,
                )
            )
            output.finish()
        except (InvalidRequest, ConfigError) as exc:  # a bad record, a CSV header without the fields
            output.discard()
            return 0, 0, exc.message
        except BaseException:
            output.discard()
            raise
        return tally.rows, tally.tokens, ""
