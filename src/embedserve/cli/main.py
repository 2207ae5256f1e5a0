"""The `embedserve` command: the parser of every subcommand, flags -> Settings, then the subcommand, with
each failure as one line and its exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from embedserve import __version__
from embedserve.cli import batches, embed, keys, models, serve, usage
from embedserve.cli.flags import settings_from
from embedserve.errors import (
    BatchNotFound,
    ConfigError,
    EmbedServeError,
    InvalidRequest,
    KeyNotFound,
    ModelLoadError,
    ServiceUnavailable,
)
from embedserve.settings import Settings

DESCRIPTION = """\
Command line: flags -> Settings, then `serve` (the HTTP server), `models` (what would be served),
`keys` (create, list, show, update, revoke API keys), `usage` (reports from the ledger), `batches`
(list, show, cancel Batch API batches) or `embed` (a corpus file embedded in this process, no server).
Failures print one line, never a traceback: exit 2 for a bad flag, setting, catalog or value, 1 for an
unknown key or batch id or a database that cannot be reached (and for a `serve` that lost usage
records)."""

Run = Callable[[Settings, argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedserve", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"embedserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (serve, models, keys, usage, batches, embed):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        print(f"embedserve: error: {where + ': ' if where else ''}{first['msg']}", file=sys.stderr)
        return 2
    from embedserve.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    run: Run = args.run
    try:
        return run(settings, args)
    except (ModelLoadError, ConfigError, InvalidRequest) as exc:
        print(f"embedserve: error: {exc.message}", file=sys.stderr)
        return 2
    except (KeyNotFound, BatchNotFound, ServiceUnavailable, EmbedServeError) as exc:
        print(f"embedserve: error: {exc.message}", file=sys.stderr)
        return 1
