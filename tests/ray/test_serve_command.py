"""`embedserve serve --ray` as a subprocess: it starts a local Ray, serves through Ray Serve's proxy on
--port, and on SIGTERM deletes the application, stops the Ray it started and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support import free_port, private_data_dir, wait_until_ok

pytestmark = pytest.mark.model  # (outside the directories conftest marks by: the replica serves the model)


def _parents() -> dict[int, int]:
    """Every live process -> its parent (from /proc; a zombie counts as gone)."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                out[int(entry.name)] = int(ppid)
    return out


def descendants(pid: int) -> set[int]:
    parents, found, frontier = _parents(), set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_serve_ray_serves_and_exits_0_on_sigterm_leaving_no_ray_process(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "EMBEDSERVE_API_KEYS": "",
        "EMBEDSERVE_DATA_DIR": str(private_data_dir(tmp_path / "d")),
    }
    command = [sys.executable, "-m", "embedserve", "serve", "--ray", "--replicas", "1", "--cpu-cores", "1"]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ok(f"{base}/ready", alive=lambda: proc.poll() is None, timeout_s=240)
        answer = httpx.post(
            f"{base}/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "hi"}, timeout=60
        )
        assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 384
        assert answer.headers["x-embedserve-replica"].startswith("SERVE_REPLICA::embedserve#")
        assert len(answer.headers.get_list("x-request-id")) == 1
        ray_processes = descendants(proc.pid)
        assert ray_processes  # the local Ray it started: its GCS, raylet, workers
        proc.send_signal(signal.SIGTERM)  # the process alone, as a supervisor sends it
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        assert b"embedserve is ready on" in stderr
        deadline = time.monotonic() + 30
        while (alive := ray_processes & set(_parents())) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"left running: {alive}"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
