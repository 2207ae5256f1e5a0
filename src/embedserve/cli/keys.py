"""`embedserve keys`: create, list, show, update and revoke API keys in the database (running servers see
a change within a second)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from embedserve.cli.flags import add_setting_flags
from embedserve.cli.output import print_json
from embedserve.settings import Settings

#: The settings that locate the database (`usage` and `serve` have them too).
STORE_SETTINGS = ("data_dir", "database_url")


def _limit(value: str) -> int | None:
    if value.lower() in ("none", "unlimited"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {value!r}") from None


def add_parser(sub: Any) -> None:
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
        add_setting_flags(parser, STORE_SETTINGS + (("key_pepper",) if parser is create else ()))
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    keys.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    from embedserve.db import open_database
    from embedserve.keys.records import KeyChanges, KeyRecord, key_json, parse_key_fields
    from embedserve.keys.secret import load_pepper
    from embedserve.keys.store import KeyStore
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
                print_json({**key_json(record), "key": secret})
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
                print_json([key_json(r) for r in records])
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
                print_json(key_json(record))
            else:
                print(("revoked: " if args.action == "revoke" else "") + describe(record))
    finally:
        db.close()
    return 0
