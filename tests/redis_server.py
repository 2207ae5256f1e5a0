"""A throwaway Redis server for the tests: Debian's redis-server on a free loopback port, no persistence,
bounded memory, stopped at the end. Without redis-server installed the tests that need it are skipped,
unless EMBEDSERVE_REQUIRE_REDIS=1 (as in CI), which makes that a failure."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import free_port

START_S = 20.0  # bound on the server's start; it takes ~10 ms


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        """SIGKILL (an outage, as a test sees it); `start_redis` on the same port brings one back."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(START_S)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_redis(port: int | None = None, *, max_memory: str = "64mb") -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("EMBEDSERVE_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    port = port or free_port()
    folder = Path(tempfile.mkdtemp(prefix="embedserve-test-redis-"))
    process = subprocess.Popen(
        [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", max_memory,
            "--dir", str(folder),
            "--protected-mode", "yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + START_S
    while not _listening(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.01)
    return RedisServer(port=port, process=process)


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
