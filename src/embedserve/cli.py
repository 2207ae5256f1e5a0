"""Command line: flags -> Settings, then `serve` (the HTTP server), `models` (what would be served),
`keys` (create, list, show, update, revoke API keys) or `usage` (reports from the ledger). Failures print
one line, never a traceback: exit 2 for a bad flag, setting, catalog or value, 1 for an unknown key id
or a database that cannot be reached (and for a `serve` that lost usage records)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from embedserve import __version__
from embedserve.catalog import Catalog, build_catalog, declared_entries
from embedserve.errors import (
    ConfigError,
    EmbedServeError,
    InvalidRequest,
    KeyNotFound,
    ModelLoadError,
    ServiceUnavailable,
)
from embedserve.settings import Settings

if TYPE_CHECKING:
    from embedserve.api.state import AppState

log = logging.getLogger("embedserve")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        default=s,
        metavar="MODEL",
        help="a bundled model, a local folder, a Hugging Face repo id, or ID=SOURCE "
        "(repeatable; default: the bundled all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--models-file",
        default=s,
        metavar="TOML",
        help="a catalog declaring several models ([[models]] tables)",
    )
    parser.add_argument(
        "--allow-download",
        action="store_true",
        default=s,
        help="fetch missing weights from the Hugging Face hub",
    )
    parser.add_argument(
        "--alias",
        dest="aliases",
        action="append",
        default=s,
        metavar="NAME=MODEL",
        help="another name for a served model, e.g. text-embedding-3-small=all-MiniLM-L6-v2 (repeatable)",
    )


def _store_flags(parser: argparse.ArgumentParser, *, pepper: bool) -> None:
    s = argparse.SUPPRESS
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=s,
        help="where the SQLite database and the key pepper live (default ./.embedserve)",
    )
    parser.add_argument(
        "--database-url",
        default=s,
        metavar="URL",
        help="postgresql://... (or sqlite:///PATH) instead of the SQLite file in --data-dir",
    )
    if pepper:
        parser.add_argument(
            "--key-pepper",
            default=s,
            metavar="SECRET",
            help="HMAC pepper of stored keys (default: the file <data-dir>/key-pepper)",
        )


def _limit(value: str) -> int | None:
    if value.lower() in ("none", "unlimited"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {value!r}") from None


def _keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage API keys (changes reach running servers within a second)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print its secret (shown only once)")
    create.add_argument("--name", required=True)
    update = actions.add_parser("update", help="change a key's name, models, limits, expiry or role")
    update.add_argument("id")
    update.add_argument("--name")
    for parser, clear in ((create, ""), (update, " ('all' clears it)")):
        parser.add_argument(
            "--models",
            dest="key_models",
            metavar="M1,M2",
            help="only these models (ids or aliases), comma-separated" + clear,
        )
        parser.add_argument(
            "--rpm",
            type=_limit,
            default=argparse.SUPPRESS,
            metavar="N",
            help="requests per minute ('none': unlimited)",
        )
        parser.add_argument(
            "--tpm",
            type=_limit,
            default=argparse.SUPPRESS,
            metavar="N",
            help="tokens per minute ('none': unlimited)",
        )
        parser.add_argument(
            "--expires",
            metavar="WHEN",
            help="a date (00:00 UTC), an ISO date-time, or a duration such as 30d"
            + (" ('never' clears it)" if clear else ""),
        )
    create.add_argument(
        "--admin", action="store_true", default=None, help="may call the management and usage routes"
    )
    update.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None)
    listing = actions.add_parser("list", help="every key, revoked and expired ones included")
    show = actions.add_parser("show", help="one key")
    show.add_argument("id")
    revoke = actions.add_parser("revoke", help="revoke a key for good")
    revoke.add_argument("id")
    for parser in (create, update, listing, show, revoke):
        _store_flags(parser, pepper=parser is create)
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _usage_parser(sub: Any) -> None:
    usage = sub.add_parser("usage", help="usage report from the ledger (tokens and cost)")
    usage.add_argument("--key", dest="usage_key", metavar="ID", help="only this key id")
    usage.add_argument("--model", dest="usage_model", metavar="MODEL", help="only this model id")
    usage.add_argument("--since", help="from this date or date-time on (UTC unless given)")
    usage.add_argument("--until", help="before this date or date-time")
    usage.add_argument("--group-by", choices=["key", "model", "day"])
    _store_flags(usage, pepper=False)
    usage.add_argument("--json", action="store_true", help="the JSON of GET /v1/usage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"embedserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = argparse.SUPPRESS

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _model_flags(serve)
    serve.add_argument("--host", default=s)
    serve.add_argument("--port", type=int, default=s)
    serve.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=s,
        metavar="KEY",
        help="accepted Bearer key, unlimited (repeatable; also EMBEDSERVE_API_KEYS, "
        "comma-separated). No key at all: the server runs open",
    )
    serve.add_argument(
        "--admin-key",
        dest="admin_keys",
        action="append",
        default=s,
        metavar="KEY",
        help="a key that may also call the management and usage routes (repeatable; "
        "also EMBEDSERVE_ADMIN_KEYS)",
    )
    serve.add_argument(
        "--key-pepper",
        default=s,
        metavar="SECRET",
        help="HMAC pepper of stored keys; replicas sharing a database need the same "
        "(default: the file <data-dir>/key-pepper, created on first use)",
    )
    serve.add_argument(
        "--database-url",
        default=s,
        metavar="URL",
        help="postgresql://... to share keys and usage between replicas (default: SQLite in --data-dir)",
    )
    serve.add_argument(
        "--usage-flush-interval",
        type=float,
        default=s,
        metavar="SECONDS",
        help="how often usage records are written (a crash loses at most this much)",
    )
    serve.add_argument(
        "--usage-journal",
        type=Path,
        default=s,
        metavar="PATH",
        help="where usage records the database would not take at shutdown wait for the "
        "next start (default <data-dir>/usage-journal.jsonl)",
    )
    serve.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default=s,
        help="auto: ONNX Runtime on CPU, torch on CUDA",
    )
    serve.add_argument(
        "--quantize", choices=["none", "int8"], default=s, help="int8: dynamically quantized ONNX graph (CPU)"
    )
    serve.add_argument(
        "--tiktoken-ids",
        choices=["cl100k_base", "o200k_base"],
        default=s,
        help="read token-id inputs that are not the model's own as this tiktoken "
        "encoding's (LangChain's default), tokenizing their text with the model's own "
        "tokenizer (per model: tiktoken_ids in the models file)",
    )
    serve.add_argument(
        "--tiktoken-file",
        type=Path,
        default=s,
        metavar="PATH",
        help="the encoding's .tiktoken ranks file (default: tiktoken's cache, TIKTOKEN_CACHE_DIR)",
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=s,
        help="the server's state: SQLite database, key pepper, ONNX cache under onnx/ "
        "(default ./.embedserve)",
    )
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default=s)
    serve.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=s)
    serve.add_argument("--max-inputs-per-request", type=int, default=s)
    serve.add_argument("--max-tokens-per-request", type=int, default=s)
    serve.add_argument(
        "--max-body-bytes", type=int, default=s, help="largest accepted request body (413 beyond)"
    )
    serve.add_argument(
        "--truncate",
        action="store_true",
        default=s,
        help="cut over-long inputs to the model's limit instead of answering 400",
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=int,
        default=s,
        help="token slots (padding included) per forward pass (default: 256 per "
        "thread of a pass on CPU, 16384 on CUDA)",
    )
    serve.add_argument("--max-batch-items", type=int, default=s)
    serve.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=s,
        help="under load, how long a batch may wait to fill, never when idle (default: 0 on CPU, 2 on CUDA)",
    )
    serve.add_argument(
        "--model-workers",
        type=int,
        default=s,
        help="onnx on CPU: forward passes run at once per model, each on cores/N "
        "threads (default: 2 from 2 cores, then one per 4 cores)",
    )
    serve.add_argument("--tokenizer-threads", type=int, default=s)
    serve.add_argument(
        "--max-queued-inputs",
        type=int,
        default=s,
        help="inputs that may wait per model; beyond it requests get 503 at once",
    )
    serve.add_argument(
        "--max-queue-wait",
        type=float,
        default=s,
        metavar="SECONDS",
        help="a request that would wait longer than this for the work queued ahead of "
        "it gets 503 at once (default 10)",
    )
    serve.add_argument(
        "--max-batch-memory",
        default=s,
        metavar="SIZE",
        help="memory the forward passes running at once may hold, e.g. 8GiB (default: "
        "half the memory left once the models are loaded)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=s,
        metavar="SECONDS",
        help="a request not answered by then gets 503 and its queued inputs are dropped",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=s,
        metavar="SECONDS",
        help="after SIGTERM, how long in-flight requests may take to finish",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=s,
        metavar="SECONDS",
        help="how long a client may take to send a request's line and headers",
    )
    serve.add_argument(
        "--max-header-bytes", type=int, default=s, help="largest request line + headers (431 beyond)"
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=s)
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=s,
        help="json: one object per line with the request's fields",
    )

    models = sub.add_parser("models", help="list the models that `serve` would load")
    _model_flags(models)
    models.add_argument("--json", action="store_true", help="machine-readable output")
    _keys_parser(sub)
    _usage_parser(sub)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


def _catalog(settings: Settings) -> Catalog:
    entries = declared_entries(settings.model_args, settings.models_file)
    return build_catalog(entries, allow_download=settings.allow_download, aliases=settings.aliases)


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


def _serve(settings: Settings) -> int:
    from embedserve.api.app import create_app
    from embedserve.api.server import build_server

    catalog = _catalog(settings)
    _check_store(settings)
    _check_tiktoken(settings, catalog)
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


def _check_tiktoken(settings: Settings, catalog: Catalog) -> None:
    """Before binding: every tiktoken encoding a model reads is on disk (never downloaded)."""
    from embedserve.tiktoken_ids import locate

    for spec in catalog.specs:
        if (name := settings.tiktoken_for(spec.tiktoken_ids)) is not None:
            try:
                locate(name, settings.tiktoken_file)
            except ConfigError as exc:
                raise ConfigError(f"model '{spec.id}': {exc.message}") from None


def _check_store(settings: Settings) -> None:
    """Before binding: the database opens (schema created or migrated), the pepper matches its keys and
    the usage journal can be written."""
    from embedserve.db import open_database
    from embedserve.journal import UsageJournal
    from embedserve.keys import KeyStore, load_pepper

    UsageJournal(settings.usage_journal_path).check()
    db = open_database(settings.database_url, settings.data_dir)
    try:
        KeyStore(db).check_pepper(load_pepper(settings.key_pepper, settings.data_dir))
    finally:
        db.close()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from embedserve.db import open_database
    from embedserve.keys import KeyChanges, KeyRecord, KeyStore, key_json, load_pepper, parse_key_fields
    from embedserve.timestamps import iso

    def describe(record: KeyRecord) -> str:
        doc = key_json(record)
        models = ",".join(doc["models"]) if doc["models"] else "all"
        return (
            f"{doc['id']}  {doc['name']!r}  {doc['prefix']}...  {doc['status']}  models={models}  "
            f"rpm={doc['rpm'] or '-'}  tpm={doc['tpm'] or '-'}  expires={doc['expires_at'] or 'never'}"
            f"  admin={'yes' if doc['admin'] else 'no'}"
        )

    payload: dict[str, Any] = {}
    changes = KeyChanges()
    if args.action in ("create", "update"):
        if args.name is not None:
            payload["name"] = args.name
        if args.key_models is not None:
            payload["models"] = (
                None
                if args.key_models.strip().lower() == "all" and args.action == "update"
                else [m for m in args.key_models.split(",") if m.strip()]
            )
        for limit in ("rpm", "tpm"):
            if limit in args:
                payload[limit] = getattr(args, limit)
        if args.expires is not None:
            payload["expires_at"] = None if args.expires.lower() == "never" else args.expires
        if args.admin is not None:
            payload["admin"] = args.admin
        # a bad value is refused before the database is opened: it is neither created nor touched
        changes = parse_key_fields(payload, creating=args.action == "create")
    db = open_database(settings.database_url, settings.data_dir)
    try:
        store = KeyStore(db)
        if args.action == "create":
            record, secret = store.create(load_pepper(settings.key_pepper, settings.data_dir), changes)
            if args.json:
                _print_json({**key_json(record), "key": secret})
            else:
                print(describe(record))
                print(secret)
                print(
                    "Keep the key now: it is stored only as a hash and will not be shown again.",
                    file=sys.stderr,
                )
        elif args.action == "list":
            records = store.list_keys()
            if args.json:
                _print_json([key_json(r) for r in records])
            else:
                header = (
                    "ID",
                    "NAME",
                    "PREFIX",
                    "STATUS",
                    "MODELS",
                    "RPM",
                    "TPM",
                    "EXPIRES",
                    "ADMIN",
                    "CREATED",
                )
                rows = [header] + [
                    (
                        r.id,
                        r.name,
                        r.prefix + "...",
                        key_json(r)["status"],
                        ",".join(r.models) if r.models else "all",
                        str(r.rpm or "-"),
                        str(r.tpm or "-"),
                        iso(r.expires_at) or "never",
                        "yes" if r.admin else "no",
                        iso(r.created_at) or "",
                    )
                    for r in records
                ]
                widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
                for row in rows:
                    print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        else:
            if args.action == "show":
                record = store.get(args.id)
            elif args.action == "revoke":
                record = store.revoke(args.id)
            else:
                record = store.update(args.id, changes)
            if args.json:
                _print_json(key_json(record))
            else:
                print(("revoked: " if args.action == "revoke" else "") + describe(record))
    finally:
        db.close()
    return 0


def _usage(settings: Settings, args: argparse.Namespace) -> int:
    from embedserve.db import open_database
    from embedserve.usage import parse_query, render_table, report

    query = parse_query(
        {
            name: value
            for name, value in (
                ("key", args.usage_key),
                ("model", args.usage_model),
                ("since", args.since),
                ("until", args.until),
                ("group_by", args.group_by),
            )
            if value is not None
        }
    )
    db = open_database(settings.database_url, settings.data_dir)
    try:
        doc = report(db, query)
    finally:
        db.close()
    if args.json:
        _print_json(doc)
    else:
        print(render_table(doc))
    return 0


def _list_models(settings: Settings, as_json: bool) -> int:
    catalog = _catalog(settings)
    rows = [
        {
            "id": s.id,
            "aliases": list(s.aliases),
            "folder": str(s.folder),
            "pooling": s.pooling,
            "normalize": s.normalize,
            "dimensions": s.dimensions,
            "matryoshka_dimensions": list(s.matryoshka_dimensions),
            "max_input_tokens": s.max_input_tokens,
            "price_per_million_input_tokens": s.price_per_million_input_tokens,
        }
        for s in catalog.specs
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(
                f"{row['id']}\t{row['dimensions']} dims\tmax {row['max_input_tokens']} tokens\t"
                f"{row['pooling']}\t{row['folder']}"
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        print(f"embedserve: error: {where + ': ' if where else ''}{first['msg']}", file=sys.stderr)
        return 2
    from embedserve.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "serve":
            return _serve(settings)
        if args.command == "keys":
            return _keys(settings, args)
        if args.command == "usage":
            return _usage(settings, args)
        return _list_models(settings, bool(getattr(args, "json", False)))
    except (ModelLoadError, ConfigError, InvalidRequest) as exc:
        print(f"embedserve: error: {exc.message}", file=sys.stderr)
        return 2
    except (KeyNotFound, ServiceUnavailable, EmbedServeError) as exc:
        print(f"embedserve: error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
