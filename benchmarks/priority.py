"""Work classes (design note 51): online latency with a batch job running, and a batch job's throughput
on an idle model, through the Engine in-process on the bundled model and the benchmark corpus
(benchmarks/corpus.py), in one run repeated `--runs` times; prints a Markdown table of medians with
[min-max] and the ratios against the Batch API's targets. Timing belongs here, never in tests.

Loads: online = one input per call, 16 concurrent callers (benchmarks/load.py's online load), alone,
beside a background stream that keeps `--lines` batch-class calls of 32 corpus inputs in flight for as
long as the online load runs, and beside the same stream sent as online-class work (what no priority
gives); light online = 2 callers (a mostly idle model, where the batch pass in flight shows), alone
and beside the batch-class stream; bulk = the corpus as calls of 32 inputs, 4 concurrent, as
online-class work and as batch-class work on an otherwise idle engine.

    .venv/bin/python benchmarks/priority.py [--limit 2000] [--runs 3] [--lines 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import minilm_corpus

from embedserve.engine import Engine
from embedserve.scheduler.batcher import RECENT_ONLINE_S
from embedserve.types import WorkClass

MODEL = "all-MiniLM-L6-v2"
BULK_INPUTS = 32
#: The light online load: 2 callers over the corpus's first 500 texts (a model mostly idle).
LIGHT_TEXTS = 500


@dataclass
class Row:
    name: str
    inputs_s: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    background_s: list[float] = field(default_factory=list)  # batch-class inputs/s meanwhile

    def median(self, values: str) -> float:
        data: list[float] = getattr(self, values)
        return statistics.median(data) if data else float("nan")


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


async def _online(engine: Engine, corpus: list[str], concurrency: int) -> tuple[float, list[float]]:
    """Each caller embeds one text, then the next: -> (seconds, each call's latency)."""
    texts = iter(corpus)
    latencies: list[float] = []

    async def caller() -> None:
        for text in texts:
            began = time.perf_counter()
            result = await engine.embed(MODEL, text)
            latencies.append(time.perf_counter() - began)
            assert result.vectors.shape[0] == 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def _bulk(engine: Engine, corpus: list[str], concurrency: int, work: WorkClass) -> float:
    chunks = iter([corpus[i : i + BULK_INPUTS] for i in range(0, len(corpus), BULK_INPUTS)])

    async def caller() -> None:
        for chunk in chunks:
            result = await engine.embed(MODEL, chunk, work=work)
            assert result.vectors.shape[0] == len(chunk)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started


async def _beside_background(
    engine: Engine, corpus: list[str], lines: int, concurrency: int, work: WorkClass = "batch"
) -> tuple[float, list[float], float]:
    """The online load while `lines` calls of 32 inputs of class `work` stay in flight: -> (online
    seconds, online latencies, background inputs embedded per second meanwhile)."""
    stop = asyncio.Event()
    embedded = 0

    async def line(first: int) -> None:
        nonlocal embedded
        start = first
        while not stop.is_set():
            chunk = [corpus[(start + i) % len(corpus)] for i in range(BULK_INPUTS)]
            start += lines * BULK_INPUTS
            result = await engine.embed(MODEL, chunk, work=work)
            if not stop.is_set():
                embedded += result.vectors.shape[0]

    background = [asyncio.create_task(line(i * BULK_INPUTS)) for i in range(lines)]
    await asyncio.sleep(0.5)  # the background queue is full before the first online call
    try:
        seconds, latencies = await _online(engine, corpus, concurrency)
        stop.set()
        return seconds, latencies, embedded / seconds
    finally:
        stop.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)


async def _run(corpus: list[str], runs: int, lines: int, rows: dict[str, Row]) -> None:
    async with Engine.open(MODEL) as engine:
        await _bulk(engine, corpus[:96], 2, "online")  # warm-up
        for run in range(runs):
            print(f"run {run + 1}/{runs}", file=sys.stderr)
            for name, texts, callers in (("online", corpus, 16), ("light", corpus[:LIGHT_TEXTS], 2)):
                seconds, latencies = await _online(engine, texts, callers)
                _record(rows[name], len(texts) / seconds, latencies)
                seconds, latencies, background = await _beside_background(engine, texts, lines, callers)
                _record(rows[f"{name} beside batch"], len(texts) / seconds, latencies, background)
            # What no priority gives: the same stream as online work (on the first texts: it is slow).
            texts = corpus[:LIGHT_TEXTS]
            seconds, latencies, background = await _beside_background(engine, texts, lines, 16, "online")
            _record(rows["online beside bulk"], len(texts) / seconds, latencies, background)

            seconds = await _bulk(engine, corpus, 4, "online")
            rows["bulk online"].inputs_s.append(len(corpus) / seconds)
            await asyncio.sleep(RECENT_ONLINE_S + 0.5)  # idle: no online input lately
            seconds = await _bulk(engine, corpus, 4, "batch")
            rows["bulk batch"].inputs_s.append(len(corpus) / seconds)


def _record(row: Row, inputs_s: float, latencies: list[float], background: float | None = None) -> None:
    row.inputs_s.append(inputs_s)
    row.p50.append(_pct(latencies, 50))
    row.p99.append(_pct(latencies, 99))
    if background is not None:
        row.background_s.append(background)


def _cell(values: list[float], fmt: str = ".1f") -> str:
    if not values:
        return ""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def _report(rows: dict[str, Row], corpus: list[str], tokens: int, runs: int, lines: int) -> None:
    print(
        f"\n{len(corpus)} texts, {tokens} tokens, {MODEL} in-process (Engine), {os.cpu_count()} CPUs, "
        f"{runs} runs, background {lines} batch-class calls of {BULK_INPUTS} in flight: "
        "median [min-max]\n"
    )
    light_texts = min(LIGHT_TEXTS, len(corpus))
    labels = {
        "online": "online (1 input/call, 16 concurrent), alone",
        "online beside batch": "online, beside a saturating batch-class stream",
        "online beside bulk": (
            f"online, beside the same stream as online-class work (no priority; {light_texts} texts)"
        ),
        "light": f"light online (1 input/call, 2 concurrent, {light_texts} texts), alone",
        "light beside batch": "light online, beside a saturating batch-class stream",
        "bulk online": f"bulk, online class ({BULK_INPUTS} inputs/call, 4 concurrent)",
        "bulk batch": "bulk, batch class, idle engine",
    }
    print("| load | inputs/s | p50 ms | p99 ms | background inputs/s meanwhile |")
    print("|---|---:|---:|---:|---:|")
    for key, label in labels.items():
        row = rows[key]
        print(
            f"| {label} | {_cell(row.inputs_s)} | {_cell(row.p50, '.0f')} | {_cell(row.p99, '.0f')} "
            f"| {_cell(row.background_s)} |"
        )
    alone, beside = rows["online"], rows["online beside batch"]
    light, light_beside = rows["light"], rows["light beside batch"]
    targets = [
        ("online p99 beside batch / alone", beside.median("p99") / alone.median("p99"), "<= 1.3"),
        ("online p50 beside batch / alone", beside.median("p50") / alone.median("p50"), ""),
        (
            "online p99 beside online-class bulk / alone (no priority)",
            rows["online beside bulk"].median("p99") / alone.median("p99"),
            "",
        ),
        ("light online p99 beside batch / alone", light_beside.median("p99") / light.median("p99"), ""),
        ("light online p50 beside batch / alone", light_beside.median("p50") / light.median("p50"), ""),
        (
            "batch class on an idle engine / bulk online class (inputs/s)",
            rows["bulk batch"].median("inputs_s") / rows["bulk online"].median("inputs_s"),
            ">= 0.9",
        ),
    ]
    print("\n| ratio (medians) | value | target |")
    print("|---|---:|---:|")
    for name, value, target in targets:
        print(f"| {name} | {value:.2f} | {target} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=2000, help="corpus size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lines", type=int, default=4, help="batch-class calls in flight beside online")
    args = parser.parse_args()

    corpus, tokens = minilm_corpus(args.limit)
    names = (
        "online",
        "online beside batch",
        "online beside bulk",
        "light",
        "light beside batch",
        "bulk online",
        "bulk batch",
    )
    rows = {name: Row(name) for name in names}
    asyncio.run(_run(corpus, args.runs, args.lines, rows))
    _report(rows, corpus, tokens, args.runs, args.lines)


if __name__ == "__main__":
    main()
