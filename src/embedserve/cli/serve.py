"""`embedserve serve`: every setting as a flag, the checks made before binding (models, database, pepper,
journal, tiktoken files), then the HTTP server until a signal drains it; with --ray, replicas on Ray
Serve (deploy/ray_serve.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from embedserve.cli.flags import add_serve_flags
from embedserve.engine import catalog_of
from embedserve.preflight import Store, check_store, check_tiktoken
from embedserve.settings import Settings

if TYPE_CHECKING:
    from embedserve.api.state import AppState

log = logging.getLogger("embedserve")


def add_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Run the OpenAI-compatible HTTP server. Every flag is also an EMBEDSERVE_<NAME> "
        "environment variable (EMBEDSERVE_MAX_BATCH_TOKENS for --max-batch-tokens, EMBEDSERVE_MODELS for "
        "--model; repeatable ones comma-separated); a flag wins over the environment.",
    )
    add_serve_flags(serve)
    serve.set_defaults(run=run)


def banner(settings: Settings, model: str, *, open_server: bool) -> str:
    base = f"http://{settings.host}:{settings.port}/v1"
    key = "none" if open_server else "YOUR_KEY"
    auth = "" if open_server else ' -H "Authorization: Bearer YOUR_KEY"'
    return "\n".join(
        [
            f"embedserve is ready on {base}",
            "  curl:",
            f"    curl {base}/embeddings -H 'Content-Type: application/json'{auth} \\",
            f'      -d \'{{"model": "{model}", "input": "hello world"}}\'',
            "  OpenAI SDK (Python):",
            "    from openai import OpenAI",
            f'    client = OpenAI(base_url="{base}", api_key="{key}")',
            f'    print(client.embeddings.create(model="{model}", input="hello world")'
            ".data[0].embedding[:4])",
        ]
    )


def run(settings: Settings, args: argparse.Namespace) -> int:
    if settings.ray:
        return _run_on_ray(settings)
    from embedserve.api.app import create_app
    from embedserve.api.server import build_server
    from embedserve.ratelimit import check_store as check_limit_store

    catalog = catalog_of(settings)
    check_limit_store(settings)  # the rate-limit store's URL (Redis itself may be down: the server starts)
    check_store(settings)
    check_tiktoken(settings, catalog)
    first = catalog.specs[0].id

    def announce(state: AppState) -> None:
        if settings.log_format == "json":  # every stderr line stays one JSON object
            base = f"http://{settings.host}:{settings.port}/v1"
            log.info("embedserve is ready on %s", base, extra={"event": "ready", "base_url": base})
        else:
            print(banner(settings, first, open_server=state.keys.open), file=sys.stderr, flush=True)

    lost: list[int] = []
    app = create_app(settings, catalog, on_ready=announce, on_closed=lost.append)
    server = build_server(app, settings)
    # The server drains on SIGTERM/SIGINT, then re-raises the signal under the handlers it found at
    # start. No-op handlers there make a graceful stop end with exit status 0, as a supervisor
    # (systemd, Kubernetes) expects, instead of "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    # 0 only when the app's shutdown ran to its end with every usage record in the database or the
    # journal; 1 when records were lost (the ledger's log line says how many), when the app never
    # started, or when a second signal cut the shutdown short (its records were never written).
    return 0 if server.started and lost == [0] else 1


def _run_on_ray(settings: Settings) -> int:
    """`serve --ray`: the replicas on Ray Serve, in the foreground until SIGINT/SIGTERM."""
    from embedserve.cluster.connect import require_ray

    require_ray()  # ConfigError naming the extra, before anything else
    from embedserve.deploy import ray_serve

    first = catalog_of(settings).specs[0].id

    def announce(store: Store) -> None:
        open_server = not (settings.api_keys or settings.admin_keys or store.managed_keys)
        if settings.log_format == "json":
            base = f"http://{settings.host}:{settings.port}/v1"
            log.info("embedserve is ready on %s", base, extra={"event": "ready", "base_url": base})
        else:
            print(banner(settings, first, open_server=open_server), file=sys.stderr, flush=True)

    return ray_serve.run(settings, on_ready=announce)
