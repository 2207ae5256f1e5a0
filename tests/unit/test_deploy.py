"""The deployment examples stay true: the systemd unit's and the Dockerfile's command lines parse with
today's CLI into valid Settings, every EMBEDSERVE_* variable they set is a real setting, and what the
Dockerfile copies exists. (No Docker engine runs here; the image itself is not built by the tests.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

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


# ---- Ray Serve: the config file and the KubeRay RayService (docs/scale-out.md)

RAY_SERVE_FILES = ("ray-serve.yaml", "rayservice.yaml")
#: Ray Serve's own pydantic models, as `ray.serve` is imported: Ray's to fix, not ours.
RAY_SERVE_WARNING = "ignore:Using extra keyword arguments on `Field`:DeprecationWarning"


def _serve_config(name: str) -> dict[str, Any]:
    import yaml

    doc = yaml.safe_load((ROOT / "deploy" / name).read_text(encoding="utf-8"))
    config: dict[str, Any] = yaml.safe_load(doc["spec"]["serveConfigV2"]) if "spec" in doc else doc
    return config


@pytest.mark.filterwarnings(RAY_SERVE_WARNING)
@pytest.mark.parametrize("name", RAY_SERVE_FILES)
def test_the_ray_serve_configs_import_the_builder_and_their_args_are_valid_settings(name: str) -> None:
    from embedserve.deploy import ray_serve

    (app,) = _serve_config(name)["applications"]
    module, _, attribute = app["import_path"].partition(":")
    assert module == ray_serve.__name__ and getattr(ray_serve, attribute) is ray_serve.app_builder
    settings = ray_serve.builder_settings(app["args"])
    assert settings.models == [app["args"]["models"]]
    options = ray_serve.deployment_options(settings, ray_serve.replica_cores(settings))
    assert options["ray_actor_options"] == {"num_cpus": settings.cpu_cores}


@pytest.mark.filterwarnings(RAY_SERVE_WARNING)
def test_replicas_are_fixed_or_autoscaled_between_min_and_max_on_ongoing_requests() -> None:
    from embedserve.deploy.ray_serve import deployment_options

    fixed = deployment_options(Settings(replicas=3), cores=2)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2}
    scaled = deployment_options(Settings(autoscale="2,6"), cores=1)
    assert "num_replicas" not in scaled
    assert {k: scaled["autoscaling_config"][k] for k in ("min_replicas", "max_replicas")} == {
        "min_replicas": 2,
        "max_replicas": 6,
    }
    assert scaled["autoscaling_config"]["target_ongoing_requests"] < scaled["max_ongoing_requests"]


@pytest.mark.filterwarnings(RAY_SERVE_WARNING)
def test_a_replica_gets_the_drains_grace_and_the_rayservice_pods_outlast_it() -> None:
    import yaml

    from embedserve.deploy.ray_serve import deployment_options

    options = deployment_options(Settings(), cores=1)
    assert options["graceful_shutdown_timeout_s"] > Settings().shutdown_grace
    service = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text(encoding="utf-8"))
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (
        workers["template"]["spec"]["terminationGracePeriodSeconds"] > options["graceful_shutdown_timeout_s"]
    )
