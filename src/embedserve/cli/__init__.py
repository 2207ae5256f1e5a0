"""The command line: `main` (the `embedserve` entry point) and its parser; each subcommand in its own
module, the flags that set Settings generated in `flags`."""

from embedserve.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
