"""`embedserve models`: the models that `serve` would load, built from the same flags and settings."""

from __future__ import annotations

import argparse
from typing import Any

from embedserve.cli.flags import add_setting_flags
from embedserve.cli.output import print_json
from embedserve.engine import catalog_of
from embedserve.settings import Settings

#: The settings that say which models are served (`serve` has them too).
MODEL_SETTINGS = ("models", "models_file", "allow_download", "aliases")


def add_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="list the models that `serve` would load")
    add_setting_flags(models, MODEL_SETTINGS)
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    catalog = catalog_of(settings)
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
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            print(
                f"{row['id']}\t{row['dimensions']} dims\tmax {row['max_input_tokens']} tokens\t"
                f"{row['pooling']}\t{row['folder']}"
            )
    return 0
