"""`embedserve embed --engine ray`: a corpus job as a Ray Data pipeline. The driver plans the pieces and
checks the output folder; Ray Data hands the pieces to N actors (PieceEmbedder, T CPUs each), which
read, embed and write a shard apiece; the driver gathers one summary row a piece (design note 54)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from embedserve.cluster.connect import connect, require_ray
from embedserve.cluster.embedder import PieceEmbedder
from embedserve.cluster.pieces import (
    PIECE_BYTES,
    Piece,
    count_lines,
    find_inputs,
    numbered,
    open_filesystem,
    plan_pieces,
)
from embedserve.cluster.shards import written_keys
from embedserve.corpus.formats import InputFormat
from embedserve.corpus.output import RunInfo
from embedserve.corpus.rows import Fields
from embedserve.corpus.run import Job
from embedserve.errors import ConfigError, EmbedServeError, InvalidRequest
from embedserve.settings import Settings
from embedserve.spec import ModelSpec

#: The output folder's record of the job that writes it: a rerun with another input, model or piece size
#: is refused instead of mixing two jobs' shards.
MANIFEST = "_embedserve.json"


@dataclass(frozen=True)
class CorpusJob:
    input: str
    output: str
    spec: ModelSpec
    job: Job
    fields: Fields = field(default_factory=Fields)
    input_format: InputFormat | None = None
    replicas: int | None = None  # None: as many as the cluster's CPUs hold at `threads` each
    threads: int = 1
    batch_tokens: int = 16384
    piece_bytes: int = PIECE_BYTES
    overwrite: bool = False


@dataclass
class JobResult:
    output: str
    pieces: int
    skipped: int  # pieces whose shards were there already
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0  # first piece started to last piece written, on the actors' clocks
    startup_seconds: float = 0.0  # Ray joined or started, the actors up and their models loaded
    replicas: int = 0
    nodes: dict[str, str] = field(default_factory=dict)  # shard key -> the Ray node that wrote it


def run_corpus_job(corpus: CorpusJob, settings: Settings, address: str | None) -> JobResult:
    """Plan, check, then run the pipeline; a bad record fails the job (ConfigError/InvalidRequest with
    its message) once every other piece is written, so a rerun after the fix does that piece only."""
    began = time.perf_counter()
    ray = require_ray()  # before anything is written: without the extra, one line saying how to get it
    source, files = find_inputs(corpus.input, corpus.input_format)
    pieces = plan_pieces(source, files, corpus.fields, corpus.piece_bytes)
    info = RunInfo(
        corpus.spec.id,
        corpus.job.dimensions or corpus.spec.dimensions,
        corpus.job.input_type,
        corpus.job.instruction,
    )
    out_fs, out = _prepare_output(corpus, info, pieces)
    started = connect(address)
    try:
        replicas = _replicas(corpus, ray, local=started and address is None)
        pieces = _numbered(ray, source, pieces)
        done = written_keys(out_fs, out)
        todo = [p for p in pieces if p.key not in done]
        result = JobResult(corpus.output, len(pieces), len(pieces) - len(todo), replicas=replicas)
        if todo:
            _run(ray, corpus, settings, source, todo, replicas, result, began)
    finally:
        if started:
            ray.shutdown()
    return result


def _prepare_output(corpus: CorpusJob, info: RunInfo, pieces: list[Piece]) -> tuple[Any, str]:
    """The output folder, created, emptied with --overwrite, its manifest written or (a rerun) checked."""
    from pyarrow import fs

    out_fs, out = open_filesystem(corpus.output)
    kind = out_fs.get_file_info(out).type
    if kind == fs.FileType.File:
        raise ConfigError(f"output {corpus.output!r} is a file: --engine ray writes a folder of shards")
    if kind == fs.FileType.Directory and corpus.overwrite:
        out_fs.delete_dir_contents(out)
    out_fs.create_dir(out, recursive=True)
    for tmp in _leftovers(out_fs, out):  # a killed run's shards cut short: their pieces are redone
        out_fs.delete_file(tmp)
    manifest = {
        "input": corpus.input if "://" in corpus.input else os.path.abspath(corpus.input),
        "run": asdict(info),
        "pieces": [[p.key, p.name, p.start, p.end] for p in pieces],
    }
    path = f"{out}/{MANIFEST}"
    if out_fs.get_file_info(path).type == fs.FileType.File:
        with out_fs.open_input_stream(path) as fh:
            found = orjson.loads(fh.read())
        differ = [k for k in manifest if found.get(k) != manifest[k]]
        if differ:
            what = {"input": "another input", "run": "another model or flags", "pieces": "other pieces"}
            raise ConfigError(
                f"output {corpus.output!r} holds the shards of another job "
                f"({', '.join(what[k] for k in differ)}): rerun with the same input and flags, or --overwrite"
            )
        return out_fs, out
    with out_fs.open_output_stream(path) as fh:
        fh.write(orjson.dumps(manifest))
    return out_fs, out


def _leftovers(out_fs: Any, out: str) -> list[str]:
    from pyarrow import fs

    entries = out_fs.get_file_info(fs.FileSelector(out))
    return [e.path for e in entries if e.base_name.startswith(".") and e.base_name.endswith(".tmp")]


def _replicas(corpus: CorpusJob, ray: Any, *, local: bool) -> int:
    """--replicas, else as many actors as the cluster's CPUs hold at --threads-per-replica each. On a
    local Ray more than it holds would never start: refused."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    replicas = corpus.replicas or max(1, cpus // corpus.threads)
    if local and replicas * corpus.threads > cpus:
        raise ConfigError(
            f"--replicas {replicas} x --threads-per-replica {corpus.threads} needs "
            f"{replicas * corpus.threads} CPUs; the local Ray has {cpus} (the cores this process may use)"
        )
    return replicas


def _numbered(ray: Any, source: Any, pieces: list[Piece]) -> list[Piece]:
    """Byte-range pieces numbered by their first line: each one's line breaks counted by a Ray task
    (in parallel, near the data on a cluster), but the last of each file, whose count no piece needs."""
    needed = [
        i
        for i, p in enumerate(pieces)
        if p.format in ("jsonl", "text") and i + 1 < len(pieces) and pieces[i + 1].path == p.path
    ]
    if not needed:
        return pieces
    counter = ray.remote(num_cpus=0.5)(count_lines)
    counts = dict(zip(needed, ray.get([counter.remote(source, pieces[i]) for i in needed]), strict=True))
    return numbered(pieces, [counts.get(i, 0) for i in range(len(pieces))])


def _run(
    ray: Any,
    corpus: CorpusJob,
    settings: Settings,
    source: Any,
    todo: list[Piece],
    replicas: int,
    result: JobResult,
    began: float,
) -> None:
    # Threads set explicitly: an actor's engine sizes itself to its CPUs, not to the node's cores. The
    # data dir (the ONNX cache) made absolute: an actor does not run in the driver's working directory.
    actor_settings = settings.model_copy(
        update={"cpu_cores": corpus.threads, "data_dir": settings.data_dir.resolve()}
    )
    dataset = ray.data.from_items([{"piece": p.to_json()} for p in todo], override_num_blocks=len(todo))
    embedded = dataset.map_batches(
        PieceEmbedder,
        fn_constructor_kwargs={
            "settings": actor_settings,
            "spec": corpus.spec,
            "job": corpus.job,
            "fields": corpus.fields,
            "source": source,
            "out": corpus.output,
            "batch_tokens": corpus.batch_tokens,
        },
        batch_size=1,
        concurrency=replicas,
        num_cpus=corpus.threads,
    )
    errors: dict[str, str] = {}
    first, last = float("inf"), 0.0
    try:
        for row in embedded.iter_rows():
            if row["error"]:
                errors[row["key"]] = row["error"]
                continue
            result.rows += row["rows"]
            result.tokens += row["tokens"]
            result.nodes[row["key"]] = row["node"]
            first, last = min(first, row["started"]), max(last, row["ended"])
    except Exception as exc:
        raise _cause(exc) from None
    result.seconds = max(0.0, last - first) if result.nodes else 0.0
    result.startup_seconds = max(0.0, time.perf_counter() - began - result.seconds)
    if errors:
        key = min(errors)  # the first in input order
        others = f" ({len(errors) - 1} more pieces failed)" if len(errors) > 1 else ""
        raise InvalidRequest(
            f"{errors[key]}{others}; the other pieces' shards are in {corpus.output}: the rerun after the "
            "fix embeds the rest"
        )


def _cause(exc: BaseException) -> EmbedServeError:
    """The embedserve error under Ray's wrappers (a model that failed to load in an actor), else one
    naming Ray's failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, EmbedServeError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    first = str(exc).strip().splitlines()
    print(str(exc), file=sys.stderr)
    return EmbedServeError(f"the Ray job failed: {first[0] if first else type(exc).__name__}")
