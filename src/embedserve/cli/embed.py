"""`embedserve embed INPUT --output OUT`: a whole corpus through the engine in this process, no server:
the input streamed in chunks, the vectors written in input order to a crash-safe output that `--resume`
continues, progress on stderr (design note 52); with --engine ray, the same job on Ray Data (note 54)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedserve.catalog import Catalog
from embedserve.cli.flags import add_setting_flags
from embedserve.cli.models import MODEL_SETTINGS
from embedserve.cli.output import print_json
from embedserve.cluster.pieces import PIECE_BYTES
from embedserve.corpus.chunks import chunked
from embedserve.corpus.formats import INPUT_FORMATS, OUTPUT_FORMATS, InputFormat, input_format, output_format
from embedserve.corpus.output import Output, RunInfo, open_output, skip_done
from embedserve.corpus.progress import LineProgress
from embedserve.corpus.readers import count_records, open_rows
from embedserve.corpus.rows import DEFAULT_ID_FIELD, DEFAULT_TEXT_FIELD, Fields, Row, Source
from embedserve.corpus.run import IN_FLIGHT, Job, Tally, embed_chunks, engine_settings
from embedserve.engine import Engine, catalog_of
from embedserve.errors import ConfigError, EmbedServeError, InvalidRequest
from embedserve.service import prefix_for
from embedserve.settings import Settings
from embedserve.spec import ModelSpec

#: The settings of the engine the command runs: which model, on which backend, batched how. The same
#: flags as `serve`'s.
ENGINE_SETTINGS = (
    *MODEL_SETTINGS,
    "backend",
    "device",
    "dtype",
    "quantize",
    "truncate",
    "max_batch_tokens",
    "model_workers",
    "cpu_cores",
    "tokenizer_threads",
    "data_dir",
    "log_level",
)
DEFAULT_BATCH_TOKENS = 16384
#: No setting of the log level: the bar and the summary are the command's output, warnings the rest.
DEFAULT_LOG_LEVEL = "warning"

DESCRIPTION = """\
Embed a corpus file with one model, in this process (no server), into a Parquet, JSONL or .npy file.
INPUT: JSONL (an object a line), CSV (a header row), Parquet, or plain text (a line each), by its
extension (.jsonl, .csv, .parquet; any other is text) or --input-format. OUT: by its extension
(.parquet, .jsonl, .npy) or --output-format. The vectors are those POST /v1/embeddings answers for the
same texts. The output is checkpointed as it goes: after a kill, --resume keeps its complete rows and
embeds the rest. Exit 2 for a bad flag, input or record (one line, naming it), 1 for an I/O failure,
128+N when stopped by signal N (checkpointed: --resume continues). With --engine ray: the same job on
Ray Data, from a file, a folder, a glob or a URI (s3://...) into a folder of Parquet shards, resumed by
a rerun (docs/scale-out.md)."""


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def add_parser(sub: Any) -> None:
    embed = sub.add_parser(
        "embed",
        help="embed a corpus file into Parquet, JSONL or .npy, without a server",
        description=DESCRIPTION,
    )
    embed.add_argument(
        "embed_input",
        metavar="INPUT",
        help="the corpus file (with --engine ray: or a folder, a glob, an s3:// or other pyarrow URI)",
    )
    embed.add_argument(
        "-o",
        "--output",
        dest="embed_output",
        metavar="OUT",
        required=True,
        help="the output file (with --engine ray: a folder of Parquet shards)",
    )
    embed.add_argument(
        "--input-format", dest="embed_input_format", choices=INPUT_FORMATS, help="default: by extension"
    )
    embed.add_argument(
        "--output-format", dest="embed_output_format", choices=OUTPUT_FORMATS, help="default: by extension"
    )
    embed.add_argument(
        "--text-field",
        dest="embed_text_field",
        metavar="NAME",
        help=f"JSONL field, CSV or Parquet column of the text (default: {DEFAULT_TEXT_FIELD})",
    )
    embed.add_argument(
        "--id-field",
        dest="embed_id_field",
        metavar="NAME",
        help=f"field or column of the id, required on every record (default: {DEFAULT_ID_FIELD} where the "
        "input has it, else the record's line or row number)",
    )
    embed.add_argument(
        "--dimensions", dest="embed_dimensions", type=_positive, metavar="N", help="Matryoshka truncation"
    )
    embed.add_argument(
        "--input-type", dest="embed_input_type", metavar="TYPE", help="query, document, or a prompt's name"
    )
    embed.add_argument("--instruction", dest="embed_instruction", metavar="TEXT", help="a query's task")
    embed.add_argument(
        "--batch-tokens",
        dest="embed_batch_tokens",
        type=_positive,
        default=DEFAULT_BATCH_TOKENS,
        metavar="N",
        help=f"about this many tokens per call to the engine, {IN_FLIGHT} calls at once "
        f"(default: {DEFAULT_BATCH_TOKENS})",
    )
    embed.add_argument(
        "--checkpoint-rows",
        dest="embed_checkpoint_rows",
        type=_positive,
        metavar="N",
        help="rows made durable at a time: a kill loses at most these (default: about 16 MiB of vectors, "
        "and a checkpoint at least every 30 s)",
    )
    again = embed.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", dest="embed_resume", action="store_true", help="continue an output: skip its rows"
    )
    again.add_argument(
        "--overwrite", dest="embed_overwrite", action="store_true", help="replace an output that exists"
    )
    embed.add_argument(
        "--progress-every",
        dest="embed_progress_every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="when stderr is not a terminal, a progress line this often (default: 5)",
    )
    embed.add_argument("--json", dest="embed_json", action="store_true", help="the summary as JSON")
    ray = embed.add_argument_group("on Ray Data (--engine ray, embedserve[ray]; docs/scale-out.md)")
    ray.add_argument(
        "--engine",
        dest="embed_engine",
        choices=("local", "ray"),
        default="local",
        help="local: in this process; ray: a Ray Data job, N actors of one engine each (default: local)",
    )
    add_setting_flags(ray, ["ray_address"])
    # Not the `replicas` setting (a server's replicas on Ray Serve): a job's actors, and its own default.
    ray.add_argument(
        "--replicas",
        dest="embed_replicas",
        type=int,
        metavar="N",
        help="actors, each with its own engine (default: the cluster's CPUs / --threads-per-replica)",
    )
    ray.add_argument(
        "--threads-per-replica",
        dest="embed_threads",
        type=_positive,
        default=1,
        metavar="T",
        help="each actor's CPUs, and its engine's threads (default: 1)",
    )
    ray.add_argument(
        "--piece-bytes",
        dest="embed_piece_bytes",
        type=_positive,
        default=PIECE_BYTES,
        metavar="N",
        help=f"JSONL and text inputs are split into pieces of about N bytes, a shard each (Parquet: a row "
        f"group each; CSV: a file each; default: {PIECE_BYTES})",
    )
    add_setting_flags(embed.add_argument_group("model and backend (as for serve)"), ENGINE_SETTINGS)
    embed.set_defaults(run=run)


@dataclass(frozen=True)
class Plan:
    """What one run does, checked before any model is loaded."""

    source: Source
    rows: Iterator[Row]
    input_format: InputFormat
    spec: ModelSpec
    job: Job
    output: Output


def run(settings: Settings, args: argparse.Namespace) -> int:
    if "log_level" not in settings.model_fields_set:
        from embedserve.logs import configure_logging

        configure_logging(DEFAULT_LOG_LEVEL, settings.log_format)
    if args.embed_engine == "ray":
        return _run_on_ray(settings, args)
    # (The flags, not the settings: EMBEDSERVE_RAY_ADDRESS set for `serve` does not stop a local run.)
    if hasattr(args, "ray_address") or args.embed_replicas is not None:
        flag = "--ray-address" if hasattr(args, "ray_address") else "--replicas"
        raise ConfigError(f"{flag} is for --engine ray")
    try:
        plan = _plan(settings, args)
        stopped: list[int] = []
        try:
            # Every call on the output goes through this one thread, in order; leaving the block waits
            # for the last (a checkpoint after a signal).
            with ThreadPoolExecutor(1, thread_name_prefix="embedserve-output") as writer:
                tally, skipped, loaded_s, seconds = asyncio.run(_embed(plan, settings, args, writer, stopped))
        except asyncio.CancelledError:
            if not stopped:
                raise
            name = signal.Signals(stopped[0]).name
            print(
                f"embedserve: stopped by {name}: {plan.output.rows:,} rows are in {plan.output.path} "
                "(--resume continues)",
                file=sys.stderr,
            )
            return 128 + stopped[0]
    except OSError as exc:
        raise EmbedServeError(str(exc)) from None
    summary = {
        "output": str(plan.output.path),
        "model": plan.spec.id,
        "dimensions": plan.output.info.dimensions,
        "rows": tally.rows,
        "tokens": tally.tokens,
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "load_seconds": round(loaded_s, 3),
        "rows_per_s": round(tally.rows / seconds, 1) if seconds > 0 else 0.0,
        "tokens_per_s": round(tally.tokens / seconds, 1) if seconds > 0 else 0.0,
    }
    if args.embed_json:
        print_json(summary)
    else:
        print(_summary_line(summary))
    return 0


def _summary_line(summary: dict[str, Any]) -> str:
    line = (
        f"embedded {summary['rows']:,} rows, {summary['tokens']:,} tokens in {summary['seconds']:.1f} s "
        f"({summary['rows_per_s']:,.0f} rows/s, {summary['tokens_per_s']:,.0f} tokens/s) into "
        f"{summary['output']}"
    )
    if summary["skipped"]:
        line += f"; {summary['skipped']:,} rows were there already"
    return line + f"; model loaded in {summary['load_seconds']:.1f} s"


def _plan(settings: Settings, args: argparse.Namespace) -> Plan:
    """Every check that needs no model loaded: formats, input and fields, the one model and what it
    accepts, the output (exists? resumable?), and on resume, that the input starts with its rows."""
    source_path, out = Path(args.embed_input), Path(args.embed_output)
    in_fmt = input_format(source_path, args.embed_input_format)
    out_fmt = output_format(out, args.embed_output_format)
    if source_path.exists() and out.exists() and source_path.resolve() == out.resolve():
        raise ConfigError(f"the output {str(out)!r} is the input")
    fields = Fields(text=args.embed_text_field or DEFAULT_TEXT_FIELD, id=args.embed_id_field)
    source, rows = open_rows(source_path, in_fmt, fields)
    spec = _one_model(settings)
    job = Job(spec.id, args.embed_dimensions, args.embed_input_type, args.embed_instruction)
    _check_job(spec, job)
    info = RunInfo(spec.id, job.dimensions or spec.dimensions, job.input_type, job.instruction)
    output = open_output(
        out,
        out_fmt,
        info,
        resume=args.embed_resume,
        overwrite=args.embed_overwrite,
        checkpoint_rows=args.embed_checkpoint_rows,
    )
    if output.rows:
        rows = skip_done(rows, output, source)
    return Plan(source, rows, in_fmt, spec, job, output)


def _one_model(settings: Settings) -> ModelSpec:
    catalog = catalog_of(settings)
    if len(catalog.specs) != 1:
        raise ConfigError(
            f"embed runs one model; {len(catalog.specs)} are declared "
            f"({', '.join(s.id for s in catalog.specs)}): give one --model, or a models file of one"
        )
    return catalog.specs[0]


def _run_on_ray(settings: Settings, args: argparse.Namespace) -> int:
    """The same job as a Ray Data pipeline (cluster/corpus_job.py): flags checked here, before Ray."""
    from embedserve.cluster.corpus_job import CorpusJob, run_corpus_job

    if args.embed_output_format not in (None, "parquet"):
        raise ConfigError("--engine ray writes Parquet shards: --output-format parquet (or none)")
    if args.embed_replicas is not None and args.embed_replicas < 1:
        raise ConfigError(f"--replicas: must be at least 1, got {args.embed_replicas}")
    spec = _one_model(settings)
    job = Job(spec.id, args.embed_dimensions, args.embed_input_type, args.embed_instruction)
    _check_job(spec, job)
    corpus = CorpusJob(
        input=args.embed_input,
        output=args.embed_output,
        spec=spec,
        job=job,
        fields=Fields(text=args.embed_text_field or DEFAULT_TEXT_FIELD, id=args.embed_id_field),
        input_format=args.embed_input_format,
        replicas=args.embed_replicas,
        threads=args.embed_threads,
        batch_tokens=args.embed_batch_tokens,
        piece_bytes=args.embed_piece_bytes,
        overwrite=args.embed_overwrite,
    )
    try:
        result = run_corpus_job(corpus, settings, settings.ray_address)
    except OSError as exc:
        raise EmbedServeError(str(exc)) from None
    seconds = result.seconds
    summary = {
        "output": result.output,
        "model": spec.id,
        "rows": result.rows,
        "tokens": result.tokens,
        "pieces": result.pieces,
        "skipped_pieces": result.skipped,
        "replicas": result.replicas,
        "seconds": round(seconds, 3),
        "startup_seconds": round(result.startup_seconds, 3),
        "rows_per_s": round(result.rows / seconds, 1) if seconds > 0 else 0.0,
        "tokens_per_s": round(result.tokens / seconds, 1) if seconds > 0 else 0.0,
    }
    if args.embed_json:
        print_json(summary)
        return 0
    line = (
        f"embedded {summary['rows']:,} rows, {summary['tokens']:,} tokens in {summary['seconds']:.1f} s "
        f"({summary['rows_per_s']:,.0f} rows/s, {summary['tokens_per_s']:,.0f} tokens/s) into "
        f"{summary['output']} with {result.replicas} replicas"
    )
    if result.skipped:
        line += f"; {result.skipped:,} of {result.pieces:,} pieces were there already"
    print(line + f"; Ray and the models started in {summary['startup_seconds']:.1f} s")
    return 0


def _check_job(spec: ModelSpec, job: Job) -> None:
    """--dimensions and --input-type as the API checks its fields, before the model loads."""
    try:
        prefix_for(
            spec,
            model=spec.id,
            dimensions=job.dimensions,
            input_type=job.input_type,
            instruction=job.instruction,
        )
    except InvalidRequest as exc:
        raise type(exc)(f"--{(exc.param or '').replace('_', '-')}: {exc.message}", param=exc.param) from None


async def _embed(
    plan: Plan, settings: Settings, args: argparse.Namespace, writer: Executor, stopped: list[int]
) -> tuple[Tally, int, float, float]:
    """Load the model, embed every chunk, finish the output: (tally, rows skipped, load seconds,
    embedding seconds). SIGINT and SIGTERM cancel the run, which checkpoints what is written."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None

    def stop(sig: int) -> None:
        stopped.append(sig)
        main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    output, skipped = plan.output, plan.output.rows
    max_items = settings.max_inputs_per_request
    engine = Engine(engine_settings(settings, max_items), Catalog([plan.spec]))
    counting = asyncio.create_task(asyncio.to_thread(count_records, plan.source.path, plan.input_format))
    started = time.perf_counter()
    async with engine:
        loaded = time.perf_counter()
        progress = _progress(args.embed_progress_every)
        counting.add_done_callback(lambda task: progress.set_total(_total(task, skipped)))
        chunks = chunked(plan.rows, batch_tokens=args.embed_batch_tokens, max_items=max_items)
        try:
            tally = await embed_chunks(
                engine,
                plan.job,
                chunks,
                output,
                where=plan.source.where,
                writer=writer,
                on_written=progress.update,
            )
            await loop.run_in_executor(writer, output.finish)
        except BaseException as exc:
            await _keep_written(loop.run_in_executor(writer, output.checkpoint), exc)
            if isinstance(exc, InvalidRequest) and output.rows > skipped:
                raise type(exc)(
                    f"{exc.message} ({output.rows:,} rows before it are in {output.path}: --resume after "
                    "the fix continues from there)",
                    param=exc.param,
                ) from None
            raise
        finally:
            progress.close()
    counting.cancel()
    return tally, skipped, loaded - started, time.perf_counter() - loaded


async def _keep_written(checkpoint: Awaitable[None], failure: BaseException) -> None:
    """After a failure, the rows written before it are made durable; a write that fails again is the
    same failure (the disk is full) and does not hide it."""
    try:
        await checkpoint
    except OSError:
        if not isinstance(failure, OSError):
            raise


def _total(task: asyncio.Task[int | None], skipped: int) -> int | None:
    """The rows left to embed, once counted (None: not countable, a pipe)."""
    if task.cancelled() or task.exception() is not None or (counted := task.result()) is None:
        return None
    return max(0, counted - skipped)


class _Bar:
    """tqdm's bar (rate and ETA) on the terminal."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(unit=" rows", dynamic_ncols=True, file=sys.stderr, desc="embed", smoothing=0.1)
        self._tokens = 0
        self._started = time.perf_counter()

    def set_total(self, total: int | None) -> None:
        self._bar.total = total
        self._bar.refresh()

    def update(self, rows: int, tokens: int) -> None:
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._started, 1e-9)
        self._bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        self._bar.update(rows)

    def close(self) -> None:
        self._bar.close()


class _Lines:
    """Plain lines on stderr when it is not a terminal (a log, a pipe, CI)."""

    def __init__(self, every_s: float) -> None:
        self._lines = LineProgress(lambda line: print(f"embed: {line}", file=sys.stderr, flush=True), every_s)

    def set_total(self, total: int | None) -> None:
        self._lines.total = total

    def update(self, rows: int, tokens: int) -> None:
        self._lines.update(rows, tokens)

    def close(self) -> None:
        pass


def _progress(every_s: float) -> _Bar | _Lines:
    return _Bar() if sys.stderr.isatty() else _Lines(every_s)
