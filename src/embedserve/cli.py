"""Command line: flags -> Settings, then `serve` (the HTTP server) or `models` (what would be served).
Start-up failures (missing weights, bad catalog) print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from embedserve import __version__
from embedserve.catalog import Catalog, build_catalog, declared_entries
from embedserve.errors import ConfigError, ModelLoadError
from embedserve.settings import Settings

log = logging.getLogger("embedserve")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("--model", dest="models", action="append", default=s, metavar="MODEL",
                        help="a bundled model, a local folder, a Hugging Face repo id, or ID=SOURCE "
                             "(repeatable; default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--models-file", default=s, metavar="TOML",
                        help="a catalog declaring several models ([[models]] tables)")
    parser.add_argument("--allow-download", action="store_true", default=s,
                        help="fetch missing weights from the Hugging Face hub")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"embedserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = argparse.SUPPRESS

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _model_flags(serve)
    serve.add_argument("--host", default=s)
    serve.add_argument("--port", type=int, default=s)
    serve.add_argument("--api-key", dest="api_keys", action="append", default=s, metavar="KEY",
                       help="accepted Bearer key (repeatable; also EMBEDSERVE_API_KEYS, "
                            "comma-separated). None: the server runs open")
    serve.add_argument("--backend", choices=["auto", "torch", "onnx"], default=s,
                       help="auto: ONNX Runtime on CPU, torch on CUDA")
    serve.add_argument("--quantize", choices=["none", "int8"], default=s,
                       help="int8: dynamically quantized ONNX graph (CPU)")
    serve.add_argument("--data-dir", type=Path, default=s,
                       help="where exported ONNX graphs are cached (default ~/.local/share/embedserve)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default=s)
    serve.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=s)
    serve.add_argument("--max-inputs-per-request", type=int, default=s)
    serve.add_argument("--max-tokens-per-request", type=int, default=s)
    serve.add_argument("--max-body-bytes", type=int, default=s,
                       help="largest accepted request body (413 beyond)")
    serve.add_argument("--truncate", action="store_true", default=s,
                       help="cut over-long inputs to the model's limit instead of answering 400")
    serve.add_argument("--max-batch-tokens", type=int, default=s,
                       help="token slots (padding included) per forward pass")
    serve.add_argument("--max-batch-items", type=int, default=s)
    serve.add_argument("--max-batch-wait-ms", type=float, default=s,
                       help="under load, how long a batch may wait to fill (never when idle)")
    serve.add_argument("--tokenizer-threads", type=int, default=s)
    serve.add_argument("--max-queued-inputs", type=int, default=s,
                       help="inputs that may wait per model; beyond it requests get 503 at once")
    serve.add_argument("--request-timeout", type=float, default=s, metavar="SECONDS",
                       help="a request not answered by then gets 503 and its queued inputs are dropped")
    serve.add_argument("--shutdown-grace", type=float, default=s, metavar="SECONDS",
                       help="after SIGTERM, how long in-flight requests may take to finish")
    serve.add_argument("--header-timeout", type=float, default=s, metavar="SECONDS",
                       help="how long a client may take to send a request's line and headers")
    serve.add_argument("--max-header-bytes", type=int, default=s,
                       help="largest request line + headers (431 beyond)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=s)
    serve.add_argument("--log-format", choices=["text", "json"], default=s,
                       help="json: one object per line with the request's fields")

    models = sub.add_parser("models", help="list the models that `serve` would load")
    _model_flags(models)
    models.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "json")}
    return Settings(**given)


def _catalog(settings: Settings) -> Catalog:

    entries = declared_entries(settings.model_args, settings.models_file)
    return build_catalog(entries, allow_download=settings.allow_download)


def banner(settings: Settings, model: str) -> str:
    base = f"http://{settings.host}:{settings.port}/v1"
    key = "YOUR_KEY" if settings.api_keys else "none"
    auth = ' -H "Authorization: Bearer YOUR_KEY"' if settings.api_keys else ""
    return "\n".join([
        f"embedserve is ready on {base}",
        "  curl:",
        f"    curl {base}/embeddings -H 'Content-Type: application/json'{auth} \\",
        f"      -d '{{\"model\": \"{model}\", \"input\": \"hello world\"}}'",
        "  OpenAI SDK (Python):",
        "    from openai import OpenAI",
        f"    client = OpenAI(base_url=\"{base}\", api_key=\"{key}\")",
        f"    print(client.embeddings.create(model=\"{model}\", input=\"hello world\")"
        ".data[0].embedding[:4])",
    ])


def _serve(settings: Settings) -> int:
    from embedserve.api.app import create_app
    from embedserve.api.server import build_server

    catalog = _catalog(settings)
    first = catalog.specs[0].id

    def announce(_state: object) -> None:
        text = banner(settings, first)
        if settings.log_format == "json":  # every stderr line stays one JSON object
            log.info(text, extra={"event": "ready",
                                  "base_url": f"http://{settings.host}:{settings.port}/v1"})
        else:
            print(text, file=sys.stderr, flush=True)

    app = create_app(settings, catalog, on_ready=announce)
    server = build_server(app, settings)
    # The server drains on SIGTERM/SIGINT, then re-raises the signal under the handlers it found at
    # start. No-op handlers there make a graceful stop end with exit status 0, as a supervisor
    # (systemd, Kubernetes) expects, instead of "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0


def _list_models(settings: Settings, as_json: bool) -> int:
    catalog = _catalog(settings)
    rows = [{"id": s.id, "aliases": list(s.aliases), "folder": str(s.folder), "pooling": s.pooling,
             "normalize": s.normalize, "dimensions": s.dimensions,
             "matryoshka_dimensions": list(s.matryoshka_dimensions),
             "max_input_tokens": s.max_input_tokens} for s in catalog.specs]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['id']}\t{row['dimensions']} dims\tmax {row['max_input_tokens']} tokens\t"
                  f"{row['pooling']}\t{row['folder']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        print(f"embedserve: error: {where + ': ' if where else ''}{first['msg']}",
              file=sys.stderr)
        return 2
    from embedserve.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "serve":
            return _serve(settings)
        return _list_models(settings, bool(getattr(args, "json", False)))
    except (ModelLoadError, ConfigError) as exc:
        print(f"embedserve: error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
