"""No usage record is lost at shutdown, on SQLite and PostgreSQL: a real `embedserve serve` process whose
database stops taking writes keeps serving embeddings, says so on /ready (200, ledger "degraded") and in
its metrics, and at SIGTERM writes the records to the journal and exits 0. The next start, with the
database back, replays them exactly once (a replay repeated after a crash counts nothing twice), so the
ledger's totals equal what the clients were answered. A journal that cannot be written either makes the
process exit 1 and say how many records were lost; a journal path that cannot be written refuses start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Storage
from embedserve.db import SqliteDatabase, open_database
from embedserve.usage import UsageQuery, report
from postgres import PostgresCluster
from support import free_port, private_data_dir, wait_until_ok

MODEL = "all-MiniLM-L6-v2"
KEY = "sk-journal-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRACE_S = 2


@dataclass
class Database:
    """The test's own database, made unreachable and back. SQLite: its folder is swapped for a plain file
    (nothing opens a file under a file, root included). PostgreSQL: the test's fresh database stops
    taking connections and its sessions are ended (the session's cluster serves other tests)."""

    url: str
    folder: Path | None = None  # SQLite's
    cluster: PostgresCluster | None = None

    @classmethod
    def of(cls, data_dir: Path, url: str | None, cluster: PostgresCluster | None) -> Database:
        if url is None:
            folder = data_dir / "db"
            return cls(url=f"sqlite:///{folder / 'embedserve.db'}", folder=folder)
        return cls(url=url, cluster=cluster)

    def _admin(self, *statements: str) -> None:
        import psycopg

        assert self.cluster is not None
        name = self.url.rsplit("/", 1)[1]
        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.format(name=name))

    def take_away(self) -> None:
        if self.folder is not None:
            self.folder.rename(self.folder.with_name("db.away"))
            self.folder.write_text("not a folder")
        else:
            self._admin(
                "ALTER DATABASE {name} ALLOW_CONNECTIONS false",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
            )

    def bring_back(self) -> None:
        """Idempotent: cleanup may call it whatever happened."""
        if self.folder is not None:
            if not self.folder.is_file():
                return
            self.folder.unlink()
            self.folder.with_name("db.away").rename(self.folder)
        else:
            self._admin("ALTER DATABASE {name} ALLOW_CONNECTIONS true")

    def totals(self) -> dict[str, Any]:
        db = open_database(self.url, Path("/nonexistent"))
        try:
            total: dict[str, Any] = report(db, UsageQuery())["total"]
            return total
        finally:
            db.close()


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    log_path: Path

    @classmethod
    def start(cls, data_dir: Path, database: Database, journal: Path, log_path: Path) -> Server:
        port = free_port()
        env = {**os.environ, "EMBEDSERVE_API_KEYS": ""}
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "embedserve",
                    "serve",
                    "--port",
                    str(port),
                    "--api-key",
                    KEY,
                    "--data-dir",
                    str(data_dir),
                    "--database-url",
                    database.url,
                    "--usage-journal",
                    str(journal),
                    "--usage-flush-interval",
                    "0.2",
                    "--shutdown-grace",
                    str(GRACE_S),
                    "--log-format",
                    "json",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        return cls(proc=proc, base=f"http://127.0.0.1:{port}", log_path=log_path)

    def wait(self, route: str = "/ready") -> None:
        wait_until_ok(f"{self.base}{route}", alive=lambda: self.proc.poll() is None)

    def stop(self) -> int:
        """SIGTERM; -> the exit status (bounded: the grace plus a stuck database call's own timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def messages(self) -> list[str]:
        return [line["message"] for line in self.log()]


def embed(server: Server, text: str, request_id: str) -> int:
    """-> the prompt tokens the client was answered."""
    response = httpx.post(
        f"{server.base}/v1/embeddings",
        headers={**AUTH, "X-Request-ID": request_id},
        json={"model": MODEL, "input": [text, text + " again"]},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    tokens: int = response.json()["usage"]["prompt_tokens"]
    return tokens


def until(check: Callable[[], bool], what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


@dataclass
class Outage:
    answered_requests: int = 0
    answered_tokens: int = 0
    ready: httpx.Response | None = None
    health: httpx.Response | None = None
    metrics: str = ""
    first: Server | None = None
    first_status: int | None = None
    journal_lines: int = 0
    replay: Server | None = None
    replay_status: int | None = None
    replay_health: dict[str, Any] = field(default_factory=dict)
    journal_after_replay: bool = True
    totals_after_replay: dict[str, Any] = field(default_factory=dict)
    again: Server | None = None
    again_status: int | None = None
    totals_after_again: dict[str, Any] = field(default_factory=dict)
    journal_after_again: bool = True


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def outage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    root = tmp_path_factory.mktemp(f"outage-{request.param}")
    data_dir = private_data_dir(root / "data")
    cluster: PostgresCluster | None = None
    url = None
    if request.param == "postgresql":
        cluster = request.getfixturevalue("postgres")
        url = cluster.fresh_database()
    database = Database.of(data_dir, url, cluster)
    journal = data_dir / "usage-journal.jsonl"
    result = Outage()
    servers: list[Server] = []
    try:
        first = Server.start(data_dir, database, journal, root / "first.log")
        servers.append(first)
        first.wait()
        database.take_away()
        # Two requests reuse one request id, as clients may: both count.
        for i, request_id in enumerate(["job-1", "job-2", "reused", "reused", "job-5"]):
            result.answered_tokens += embed(first, f"text number {i} " * (i + 1), request_id)
            result.answered_requests += 1

        def degraded() -> bool:
            checks = httpx.get(f"{first.base}/ready").json().get("checks", {})
            return bool(checks) and checks["ledger"]["status"] == checks["keys"]["status"] == "degraded"

        until(degraded, "the ledger and the key store never said degraded")
        result.ready = httpx.get(f"{first.base}/ready")
        result.health = httpx.get(f"{first.base}/health")
        result.metrics = httpx.get(f"{first.base}/metrics").text
        result.first, result.first_status = first, first.stop()
        result.journal_lines = len(journal.read_bytes().splitlines()) if journal.exists() else 0
        copy = journal.read_bytes() if journal.exists() else b""

        database.bring_back()
        replay = Server.start(data_dir, database, journal, root / "replay.log")
        servers.append(replay)
        replay.wait("/health")  # the replay is done before the server answers at all
        result.replay_health = httpx.get(f"{replay.base}/health").json()
        result.replay, result.replay_status = replay, replay.stop()
        result.journal_after_replay = journal.exists()
        result.totals_after_replay = database.totals()

        # A crash after the replay committed and before the journal was removed: it comes back.
        journal.write_bytes(copy)
        again = Server.start(data_dir, database, journal, root / "again.log")
        servers.append(again)
        again.wait("/health")
        result.again, result.again_status = again, again.stop()
        result.totals_after_again = database.totals()
        result.journal_after_again = journal.exists()
        yield result
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
        database.bring_back()


def test_while_the_database_is_down_embeddings_are_served_and_ready_stays_200_saying_it_is_degraded(
    outage: Outage,
) -> None:
    assert outage.answered_requests == 5  # every request was answered 200 (embed() checks)
    assert outage.ready is not None and outage.ready.status_code == 200
    body = outage.ready.json()
    assert body["status"] == "ready"
    ledger, keys = body["checks"]["ledger"], body["checks"]["keys"]
    assert ledger["status"] == "degraded"
    assert ledger["pending_records"] == 5
    assert ledger["write_failures"] >= 1
    assert ledger["last_write"].endswith("Z")  # the start: nothing was left to write then
    assert keys["status"] == "degraded" and keys["refresh_failures"] >= 1 and keys["last_refresh"]
    assert outage.health is not None and outage.health.status_code == 200
    assert outage.health.json()["status"] == "ok"
    assert outage.health.json()["checks"]["ledger"]["status"] == "degraded"


def test_the_metrics_show_the_pending_records_the_failures_and_when_each_last_succeeded(
    outage: Outage,
) -> None:
    text = outage.metrics
    assert metric(text, "embedserve_usage_pending_records") == 5
    assert metric(text, "embedserve_usage_write_failures_total") >= 1
    assert metric(text, "embedserve_keys_refresh_failures_total") >= 1
    now = time.time()
    for name in (
        "embedserve_usage_last_write_timestamp_seconds",
        "embedserve_keys_last_refresh_timestamp_seconds",
    ):
        assert now - 3600 < metric(text, name) < now


def test_at_sigterm_the_records_the_database_refuses_go_to_the_journal_and_the_process_exits_0(
    outage: Outage,
) -> None:
    assert outage.first is not None
    messages = outage.first.messages()
    assert outage.first_status == 0, messages[-10:]
    assert outage.journal_lines == 5
    (journaled,) = [m for m in messages if "written to the journal" in m]
    assert journaled.startswith("usage ledger: 5 records the database")
    assert not [m for m in messages if "LOST" in m]


def test_the_next_start_replays_the_journal_once_and_the_totals_equal_what_the_clients_were_answered(
    outage: Outage,
) -> None:
    assert outage.replay is not None and outage.replay_status == 0
    assert outage.totals_after_replay["requests"] == outage.answered_requests
    assert outage.totals_after_replay["prompt_tokens"] == outage.answered_tokens
    assert not outage.journal_after_replay
    assert "usage ledger: replayed 5 records from the journal" in "\n".join(outage.replay.messages())
    assert outage.replay_health["checks"]["ledger"] == {
        "status": "ok",
        "pending_records": 0,
        "write_failures": 0,
        "last_write": outage.replay_health["checks"]["ledger"]["last_write"],
    }


def test_a_journal_replayed_again_after_a_crash_before_its_removal_counts_nothing_twice(
    outage: Outage,
) -> None:
    assert outage.again is not None and outage.again_status == 0
    assert outage.totals_after_again == outage.totals_after_replay
    assert not outage.journal_after_again
    assert any("(0 new, 5 already written)" in m for m in outage.again.messages())


def test_a_journal_that_cannot_be_written_either_makes_the_process_exit_1_saying_how_many_were_lost(
    storage: Storage, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    cluster = request.getfixturevalue("postgres") if storage.url else None
    database = Database.of(storage.data_dir, storage.url, cluster)
    folder = tmp_path / "journal"
    server = Server.start(storage.data_dir, database, folder / "usage-journal.jsonl", tmp_path / "log")
    try:
        server.wait()
        database.take_away()
        shutil.rmtree(folder, ignore_errors=True)
        folder.write_text("the journal's folder is gone")
        for i in range(3):
            embed(server, f"lost text {i}", f"lost-{i}")
        until(
            lambda: httpx.get(f"{server.base}/ready").json()["checks"]["ledger"]["status"] == "degraded",
            "the ledger never said degraded",
        )
        status = server.stop()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        database.bring_back()
    lost = [line for line in server.log() if "LOST" in line["message"]]
    assert status == 1
    assert len(lost) == 1
    assert lost[0]["level"] == "error"
    assert lost[0]["message"].startswith("usage ledger: 3 usage records LOST in this run")


def test_a_journal_path_that_cannot_be_written_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    journal = tmp_path / "a-file" / "usage-journal.jsonl"
    data_dir = private_data_dir(tmp_path / "data")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedserve",
            "serve",
            "--data-dir",
            str(data_dir),
            "--usage-journal",
            str(journal),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"embedserve: error: cannot write the usage journal {journal}: [Errno 17] File exists: "
        f"'{journal.parent}'"
    ]
    assert not SqliteDatabase(data_dir / "embedserve.db").path.exists()  # refused before any state
