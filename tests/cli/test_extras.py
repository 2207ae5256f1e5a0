"""Optional dependencies: PostgreSQL's driver is the `postgres` extra, the Redis client the `redis` extra.
In a process that cannot import one (as after a default install), every module imports, SQLite and the
in-process rate limits work, and a postgresql:// database or a redis:// rate-limit store is refused with
one line that names the extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXTRA_LINE = (
    "embedserve: error: --database-url names a PostgreSQL database, whose driver is not installed: "
    "pip install 'embedserve[postgres]'"
)
#: Loaded at start-up from PYTHONPATH: a finder that refuses the driver's packages, as if never installed.
SITECUSTOMIZE = """
import sys


class _NoPostgresDriver:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"psycopg", "psycopg_pool", "psycopg_binary", "psycopg_c"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoPostgresDriver())
"""
URL = "postgresql://embedserve:s3cret-password@127.0.0.1:1/embedserve"


@pytest.fixture
def without_driver(tmp_path: Path) -> dict[str, str]:
    """The environment of a process in which psycopg cannot be imported."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in [str(site), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)


def test_the_driver_is_really_missing_in_that_process(without_driver: dict[str, str]) -> None:
    result = run(without_driver, "-c", "import psycopg_pool")
    assert result.returncode == 1
    assert "No module named 'psycopg_pool'" in result.stderr


def test_every_module_imports_without_the_driver(without_driver: dict[str, str]) -> None:
    code = (
        "import importlib, pkgutil, sys, embedserve\n"
        "names = [m.name for m in pkgutil.walk_packages(embedserve.__path__, 'embedserve.')]\n"
        "for name in names:\n"
        "    if name != 'embedserve.__main__':  # runs the CLI\n"
        "        importlib.import_module(name)\n"
        "assert not [m for m in sys.modules if m.startswith('psycopg')]\n"
        "print(len(names))\n"
    )
    result = run(without_driver, "-c", code)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 20  # the walk found the package's modules


@pytest.mark.parametrize("command", [["keys", "list"], ["usage"], ["serve", "--port", "0"]])
def test_a_postgresql_database_without_the_driver_is_refused_with_one_line_naming_the_extra(
    without_driver: dict[str, str], tmp_path: Path, command: list[str]
) -> None:
    result = run(
        without_driver, "-m", "embedserve", *command, "--database-url", URL, "--data-dir", str(tmp_path)
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [EXTRA_LINE]
    assert result.stdout == ""
    assert "s3cret-password" not in result.stderr


def test_the_default_sqlite_database_works_without_the_driver(
    without_driver: dict[str, str], tmp_path: Path
) -> None:
    data_dir = str(tmp_path)
    created = run(
        without_driver, "-m", "embedserve", "keys", "create", "--name", "ci", "--data-dir", data_dir
    )
    assert created.returncode == 0, created.stderr
    listed = run(without_driver, "-m", "embedserve", "keys", "list", "--data-dir", data_dir)
    assert listed.returncode == 0, listed.stderr
    assert "ci" in listed.stdout.split()


# ---- the Redis client is the `redis` extra -----------------------------------------------------------

NO_REDIS = SITECUSTOMIZE.replace("_NoPostgresDriver", "_NoRedisClient").replace(
    '{"psycopg", "psycopg_pool", "psycopg_binary", "psycopg_c"}', '{"redis"}'
)
REDIS_LINE = (
    "embedserve: error: --rate-limit-store names a Redis server, whose client is not installed: "
    "pip install 'embedserve[redis]'"
)


@pytest.fixture
def without_redis(tmp_path: Path) -> dict[str, str]:
    """The environment of a process in which redis cannot be imported."""
    site = tmp_path / "site-no-redis"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_REDIS)
    path = os.pathsep.join(p for p in [str(site), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path}


def test_every_module_imports_without_the_redis_client(without_redis: dict[str, str]) -> None:
    code = (
        "import importlib, pkgutil, sys, embedserve\n"
        "try:\n"
        "    import redis\n"
        "    raise SystemExit('redis imported')\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "for m in pkgutil.walk_packages(embedserve.__path__, 'embedserve.'):\n"
        "    if m.name != 'embedserve.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "assert not [m for m in sys.modules if m.startswith('redis')]\n"
    )
    result = run(without_redis, "-c", code)
    assert result.returncode == 0, result.stderr


def test_a_redis_store_without_the_client_is_refused_with_one_line_naming_the_extra(
    without_redis: dict[str, str], tmp_path: Path
) -> None:
    result = run(
        without_redis,
        "-m",
        "embedserve",
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path),
        "--rate-limit-store",
        "redis://:s3cret-password@127.0.0.1:1/0",
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [REDIS_LINE]
    assert "s3cret-password" not in result.stderr
