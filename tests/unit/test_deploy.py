"""The deployment examples stay true: the systemd unit's and the Dockerfile's command lines parse with
today's CLI into valid Settings, every EMBEDSERVE_* variable they set is a real setting, and what the
Dockerfile copies exists. (No Docker engine runs here; the image itself is not built by the tests.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from embedserve.cli import build_parser
from embedserve.cli.flags import settings_from
from embedserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
UNIT = (ROOT / "deploy" / "embedserve.service").read_text(encoding="utf-8")
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
SETTINGS = {f"EMBEDSERVE_{name.upper()}" for name in Settings.model_fields}


def _unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.splitlines() if line.startswith(f"{key}=")]


def _parses(argv: list[str]) -> Settings:
    return settings_from(build_parser().parse_args(argv))


def test_the_units_command_line_parses_into_valid_settings() -> None:
    (exec_start,) = _unit_values("ExecStart")
    binary, *argv = shlex.split(exec_start)
    assert binary.endswith("/embedserve")
    settings = _parses(argv)
    assert settings.log_format == "json"
    assert settings.host == "0.0.0.0"


def test_the_units_stop_timeout_outlasts_the_shutdown_grace() -> None:
    (exec_start,) = _unit_values("ExecStart")
    grace = _parses(shlex.split(exec_start)[1:]).shutdown_grace
    (stop,) = _unit_values("TimeoutStopSec")
    assert float(stop) > grace, "systemd would SIGKILL the server while it drains"


def test_the_dockerfiles_entrypoint_and_cmd_parse_into_valid_settings() -> None:
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", DOCKERFILE, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.+)$", DOCKERFILE, re.M).group(1))  # type: ignore[union-attr]
    assert entrypoint[0] == "embedserve"
    _parses([*entrypoint[1:], *cmd])


@pytest.mark.parametrize("name", sorted(set(re.findall(r"\b(EMBEDSERVE_[A-Z_]+)=", UNIT + DOCKERFILE))))
def test_every_variable_the_examples_set_is_a_setting(name: str) -> None:
    assert name in SETTINGS


@pytest.mark.parametrize(
    "source",
    [part for line in DOCKERFILE.splitlines() if line.startswith("COPY ") for part in line.split()[1:-1]],
)
def test_what_the_dockerfile_copies_exists(source: str) -> None:
    assert (ROOT / source).exists()
