"""`embedserve batches`: list, show and cancel the Batch API's batches in the database, for operators (every
key's batches; a running server's runner sees a cancel within its poll)."""

from __future__ import annotations

import argparse
from typing import Any

from embedserve.cli.flags import add_setting_flags
from embedserve.cli.keys import STORE_SETTINGS
from embedserve.cli.output import print_json
from embedserve.settings import Settings
from embedserve.timestamps import iso


def add_parser(sub: Any) -> None:
    batches = sub.add_parser("batches", help="list, show and cancel Batch API batches (every key's)")
    actions = batches.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="batches, newest first")
    listing.add_argument("--limit", type=int, default=20, metavar="N", help="at most this many (1..100)")
    listing.add_argument("--after", metavar="ID", help="those older than this batch")
    show = actions.add_parser("show", help="one batch, whole")
    show.add_argument("id")
    cancel = actions.add_parser("cancel", help="stop taking a batch's lines; it ends `cancelled`")
    cancel.add_argument("id")
    for parser in (listing, show, cancel):
        add_setting_flags(parser, STORE_SETTINGS)
        parser.add_argument("--json", action="store_true", help="the JSON of the API")
        parser.set_defaults(run=run)


def _table(rows: list[dict[str, Any]]) -> str:
    header = ["ID", "STATUS", "OWNER", "CREATED", "COMPLETED", "FAILED", "TOTAL", "INPUT_TOKENS"]
    lines = [
        [
            row["id"],
            row["status"],
            row["owner"],
            iso(row["created_at"]) or "-",
            str(row["request_counts"]["completed"]),
            str(row["request_counts"]["failed"]),
            str(row["request_counts"]["total"]),
            str(row["usage"]["input_tokens"]),
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 4 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in [header, *lines]
    )


def run(settings: Settings, args: argparse.Namespace) -> int:
    from embedserve.batches.params import parse_list_params
    from embedserve.batches.records import batch_json
    from embedserve.batches.store import BatchStore
    from embedserve.db import open_database

    db = open_database(settings.database_url, settings.data_dir)
    try:
        store = BatchStore(db)
        if args.action == "list":
            after, limit = parse_list_params(
                {"limit": str(args.limit), **({"after": args.after} if args.after else {})}
            )
            records, more = store.page(None, after=after, limit=limit)
            rows = [{**batch_json(r), "owner": r.owner} for r in records]
            if args.json:
                print_json({"object": "list", "data": rows, "has_more": more})
            else:
                print(_table(rows))
            return 0
        record = store.load(args.id) if args.action == "show" else store.cancel(args.id, None)
        if record is None:
            from embedserve.errors import BatchNotFound

            raise BatchNotFound(f"No such batch: {args.id[:80]}")
        doc = {**batch_json(record), "owner": record.owner}
        if args.json:
            print_json(doc)
        else:
            print(_table([doc]))
            if record.errors:
                for error in record.errors:
                    where = f"line {error.line}: " if error.line is not None else ""
                    print(f"  {where}{error.code}: {error.message}")
        return 0
    finally:
        db.close()
