"""`embedserve usage`: a usage report (tokens and cost) from the ledger, as a table or as GET /v1/usage's
JSON."""

from __future__ import annotations

import argparse
from typing import Any

from embedserve.cli.flags import add_setting_flags
from embedserve.cli.keys import STORE_SETTINGS
from embedserve.cli.output import print_json
from embedserve.settings import Settings


def add_parser(sub: Any) -> None:
    usage = sub.add_parser("usage", help="usage report from the ledger (tokens and cost)")
    usage.add_argument("--key", dest="usage_key", metavar="ID", help="only this key id")
    usage.add_argument("--model", dest="usage_model", metavar="MODEL", help="only this model id")
    usage.add_argument("--since", help="from this date or date-time on (UTC unless given)")
    usage.add_argument("--until", help="before this date or date-time")
    usage.add_argument("--group-by", choices=["key", "model", "day", "batch"])
    add_setting_flags(usage, STORE_SETTINGS)
    usage.add_argument("--json", action="store_true", help="the JSON of GET /v1/usage")
    usage.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
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
        print_json(doc)
    else:
        print(render_table(doc))
    return 0
