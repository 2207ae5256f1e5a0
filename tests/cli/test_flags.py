"""The flags are the settings: every setting is a `serve` flag spelled as before (or listed env-only),
every flag sets its setting, flags shared by subcommands are the same flag, and `serve --help` gives
every flag a help line that shows its default, in sections."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from embedserve.cli import build_parser
from embedserve.cli.flags import ENV_ONLY, GROUPS, RENAMED, settings_from
from embedserve.settings import Settings

# The public spelling of every serve flag. A renamed setting changes its flag: this list makes that a
# decision (and a README edit), not an accident.
SERVE_FLAGS = {
    "--model": "models",
    "--models-file": "models_file",
    "--allow-download": "allow_download",
    "--alias": "aliases",
    "--tiktoken-ids": "tiktoken_ids",
    "--tiktoken-file": "tiktoken_file",
    "--backend": "backend",
    "--device": "device",
    "--dtype": "dtype",
    "--quantize": "quantize",
    "--api-key": "api_keys",
    "--admin-key": "admin_keys",
    "--key-pepper": "key_pepper",
    "--data-dir": "data_dir",
    "--database-url": "database_url",
    "--usage-flush-interval": "usage_flush_interval",
    "--usage-journal": "usage_journal",
    "--max-inputs-per-request": "max_inputs_per_request",
    "--max-tokens-per-request": "max_tokens_per_request",
    "--max-body-bytes": "max_body_bytes",
    "--truncate": "truncate",
    "--request-timeout": "request_timeout",
    "--max-batch-tokens": "max_batch_tokens",
    "--max-batch-items": "max_batch_items",
    "--max-batch-wait-ms": "max_batch_wait_ms",
    "--model-workers": "model_workers",
    "--cpu-cores": "cpu_cores",
    "--tokenizer-threads": "tokenizer_threads",
    "--max-queued-inputs": "max_queued_inputs",
    "--max-queue-wait": "max_queue_wait",
    "--max-batch-memory": "max_batch_memory",
    "--files-dir": "files_dir",
    "--max-file-bytes": "max_file_bytes",
    "--files-min-free": "files_min_free",
    "--file-expiry": "file_expiry",
    "--batch-max-requests": "batch_max_requests",
    "--batch-max-inputs": "batch_max_inputs",
    "--batch-window": "batch_window",
    "--batch-max-queued-tokens": "batch_max_queued_tokens",
    "--sweep-interval": "sweep_interval",
    "--ray": "ray",
    "--ray-address": "ray_address",
    "--replicas": "replicas",
    "--autoscale": "autoscale",
    "--batch-executor": "batch_executor",
    "--batch-store": "batch_store",
    "--rate-limit-store": "rate_limit_store",
    "--rate-limit-fallback": "rate_limit_fallback",
    "--host": "host",
    "--port": "port",
    "--shutdown-grace": "shutdown_grace",
    "--header-timeout": "header_timeout",
    "--max-header-bytes": "max_header_bytes",
    "--log-level": "log_level",
    "--log-format": "log_format",
}

# A value for each setting's flag, unlike its default, and what the setting then holds.
SAMPLES: dict[str, tuple[list[str], Any]] = {
    "models": (["--model", "a", "--model", "b=./b"], ["a", "b=./b"]),
    "models_file": (["--models-file", "m.toml"], Path("m.toml")),
    "allow_download": (["--allow-download"], True),
    "aliases": (["--alias", "x=a", "--alias", "y=a"], ["x=a", "y=a"]),
    "tiktoken_ids": (["--tiktoken-ids", "o200k_base"], "o200k_base"),
    "tiktoken_file": (["--tiktoken-file", "r.tiktoken"], Path("r.tiktoken")),
    "backend": (["--backend", "onnx"], "onnx"),
    "device": (["--device", "cpu"], "cpu"),
    "dtype": (["--dtype", "float16"], "float16"),
    "quantize": (["--quantize", "int8"], "int8"),
    "api_keys": (["--api-key", "k1", "--api-key", "k2"], ["k1", "k2"]),
    "admin_keys": (["--admin-key", "a1"], ["a1"]),
    "key_pepper": (["--key-pepper", "pepper"], "pepper"),
    "data_dir": (["--data-dir", "/srv/es"], Path("/srv/es")),
    "database_url": (["--database-url", "sqlite:///x.db"], "sqlite:///x.db"),
    "usage_flush_interval": (["--usage-flush-interval", "2.5"], 2.5),
    "usage_journal": (["--usage-journal", "j.jsonl"], Path("j.jsonl")),
    "max_inputs_per_request": (["--max-inputs-per-request", "16"], 16),
    "max_tokens_per_request": (["--max-tokens-per-request", "1000"], 1000),
    "max_body_bytes": (["--max-body-bytes", "4096"], 4096),
    "truncate": (["--truncate"], True),
    "request_timeout": (["--request-timeout", "7.5"], 7.5),
    "max_batch_tokens": (["--max-batch-tokens", "512"], 512),
    "max_batch_items": (["--max-batch-items", "8"], 8),
    "max_batch_wait_ms": (["--max-batch-wait-ms", "3"], 3.0),
    "model_workers": (["--model-workers", "3"], 3),
    "cpu_cores": (["--cpu-cores", "1"], 1),
    "tokenizer_threads": (["--tokenizer-threads", "4"], 4),
    "max_queued_inputs": (["--max-queued-inputs", "4096"], 4096),
    "max_queue_wait": (["--max-queue-wait", "2"], 2.0),
    "max_batch_memory": (["--max-batch-memory", "2GiB"], 2 * 1024**3),
    "files_dir": (["--files-dir", "/srv/files"], Path("/srv/files")),
    "max_file_bytes": (["--max-file-bytes", "1GiB"], 1024**3),
    "files_min_free": (["--files-min-free", "0"], 0),
    "file_expiry": (["--file-expiry", "3600"], 3600.0),
    "batch_max_requests": (["--batch-max-requests", "10"], 10),
    "batch_max_inputs": (["--batch-max-inputs", "20"], 20),
    "batch_window": (["--batch-window", "5"], 5.0),
    "batch_max_queued_tokens": (["--batch-max-queued-tokens", "1000"], 1000),
    "sweep_interval": (["--sweep-interval", "0.5"], 0.5),
    "ray": (["--ray"], True),
    "ray_address": (["--ray-address", "10.0.0.1:6379"], "10.0.0.1:6379"),
    "replicas": (["--replicas", "3"], 3),
    "autoscale": (["--autoscale", "1,4"], "1,4"),
    "batch_executor": (["--batch-executor", "ray"], "ray"),
    "batch_store": (["--batch-store", "s3://bucket/batches"], "s3://bucket/batches"),
    "rate_limit_store": (["--rate-limit-store", "redis://127.0.0.1:6379/0"], "redis://127.0.0.1:6379/0"),
    "rate_limit_fallback": (["--rate-limit-fallback", "refuse"], "refuse"),
    "host": (["--host", "0.0.0.0"], "0.0.0.0"),
    "port": (["--port", "9001"], 9001),
    "shutdown_grace": (["--shutdown-grace", "0"], 0.0),
    "header_timeout": (["--header-timeout", "3"], 3.0),
    "max_header_bytes": (["--max-header-bytes", "2048"], 2048),
    "log_level": (["--log-level", "debug"], "debug"),
    "log_format": (["--log-format", "json"], "json"),
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its path, e.g. 'keys create'."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return found


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


SERVE = _flags(_subparsers(build_parser())["serve"])


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("EMBEDSERVE_"):
            monkeypatch.delenv(name)


def test_every_setting_has_a_serve_flag_unless_listed_env_only() -> None:
    assert {a.dest for a in SERVE.values()} == set(Settings.model_fields) - ENV_ONLY
    assert set(Settings.model_fields) >= ENV_ONLY


def test_the_serve_flags_are_spelled_as_before_and_each_names_its_setting() -> None:
    assert {flag: action.dest for flag, action in SERVE.items()} == SERVE_FLAGS
    for field, flag in RENAMED.items():
        assert SERVE_FLAGS[flag] == field


def test_there_is_a_sample_for_every_setting() -> None:
    assert set(SAMPLES) == set(Settings.model_fields)


@pytest.mark.parametrize("field", sorted(SAMPLES))
def test_each_flag_sets_its_setting_and_leaves_the_others_at_their_defaults(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch)
    argv, expected = SAMPLES[field]
    settings = settings_from(build_parser().parse_args(["serve", *argv]))
    assert getattr(settings, field) == expected
    defaults = Settings()
    for other in Settings.model_fields:
        if other != field:
            assert getattr(settings, other) == getattr(defaults, other), other


def test_a_flag_wins_over_the_environment_and_an_absent_flag_leaves_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("EMBEDSERVE_PORT", "9100")
    monkeypatch.setenv("EMBEDSERVE_MODELS", "a,b")
    assert settings_from(build_parser().parse_args(["serve"])).port == 9100
    given = settings_from(build_parser().parse_args(["serve", "--port", "9200", "--model", "c"]))
    assert (given.port, given.models) == (9200, ["c"])


def test_flags_shared_by_subcommands_are_the_serve_flag_of_the_same_setting() -> None:
    shared = 0
    for path, parser in _subparsers(build_parser()).items():
        if path == "serve":
            continue
        for flag, action in _flags(parser).items():
            if action.dest in Settings.model_fields:
                serve = SERVE[flag]
                assert (action.dest, action.help, action.type, action.choices, type(action)) == (
                    serve.dest,
                    serve.help,
                    serve.type,
                    serve.choices,
                    type(serve),
                ), f"{path} {flag}"
                shared += 1
    assert shared >= 10  # models: 4, keys: 2 per action (+ the pepper on create), usage: 2


def _help_blocks(text: str) -> dict[str, str]:
    """`--help` text -> each option's whole help, whitespace collapsed, by its flag."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if match := re.match(r"^  (--[a-z-]+)(?: \S+)?(?:  +|$)", line):  # flag, metavar, then help
            current = match.group(1)
            blocks[current] = line[match.end() :]
        elif current and line.startswith("   "):
            blocks[current] += " " + line
        else:
            current = None
    return {flag: " ".join(block.split()) for flag, block in blocks.items()}


def _serve_help() -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSERVE_")}
    result = subprocess.run(
        [sys.executable, "-m", "embedserve", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "COLUMNS": "240"},  # one line per flag: nothing hyphenated across lines
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_serve_flag_has_help_that_shows_its_default() -> None:
    text = _serve_help()
    blocks = _help_blocks(text)
    assert set(blocks) == set(SERVE_FLAGS)
    defaults = Settings.model_construct()  # the declared defaults, no environment
    for flag, field in SERVE_FLAGS.items():
        help_, info = blocks[flag], Settings.model_fields[field]
        shown = re.search(r"\((?:repeatable; )?default: (.+)\)$", help_)
        assert shown, f"{flag}: {help_!r}"
        assert info.description and help_.startswith(info.description), flag
        value, text = getattr(defaults, field), shown.group(1)
        if isinstance(value, bool):
            assert text == ("on" if value else "off"), flag
        elif isinstance(value, int | float | str):  # the value itself, perhaps with a gloss after a comma
            assert text.split(",")[0] == (f"{value:.15g}" if isinstance(value, float) else str(value)), flag
        elif isinstance(value, Path):
            assert str(value) in text, flag
        else:
            assert value in (None, []) and text, flag


def test_serve_help_lists_the_flags_in_sections_in_order() -> None:
    text = _serve_help()
    positions = [text.index(f"\n{title}:\n") for title in GROUPS.values()]
    assert positions == sorted(positions)
    models, auth = text.index("\nmodels and backends:\n"), text.index("\nAPI keys:\n")
    assert models < text.index("  --model MODEL") < auth < text.index("  --api-key KEY")
