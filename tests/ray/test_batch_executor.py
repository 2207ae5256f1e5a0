"""The Batch API with `--batch-executor ray`: a real `embedserve serve` process joined to the module's
local Ray, the bundled model in the cluster's actors, the official openai client. A batch completes with
the online route's vectors; killed (SIGKILL) or stopped (SIGTERM) mid-job, the server's next start
commits every line exactly once and bills it once, whether the job ran on meanwhile or was gone; a
cancel stops the job. Each job's length is set by its input's size."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from conftest import Storage
from embedserve.cluster.batch_job import NAMESPACE, driver_name
from gates import wait_until
from hermetic import DATA_DIR
from rayenv import local_ray
from support import server_process

pytestmark = pytest.mark.model

MODEL = "all-MiniLM-L6-v2"
TEXT = "the line {i} of a corpus that is long enough to take the model a while to get through, " * 2


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    with local_ray() as ray:
        yield ray.get_runtime_context().gcs_address


@contextmanager
def serving(storage: Storage, address: str, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    # The ONNX graph is exported once for the session (the servers' and the actors' engines read it).
    graphs = storage.data_dir / "onnx"
    if not graphs.exists():
        Path(DATA_DIR, "onnx").mkdir(exist_ok=True)
        graphs.symlink_to(Path(DATA_DIR, "onnx"))
    flags = (*flags, "--data-dir", str(storage.data_dir), "--batch-executor", "ray", "--ray-address", address)
    if storage.url is not None:
        flags += ("--database-url", storage.url)
    with server_process(*flags) as server:
        yield server.base, server.proc


def request(i: int, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "custom_id": f"line-{i}",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": body or {"model": MODEL, "input": TEXT.format(i=i)},
    }


def submit(base: str, lines: list[dict[str, Any]]) -> str:
    sdk = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = sdk.files.create(file=("corpus.jsonl", data), purpose="batch")
    return sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    ).id


def completed_count(base: str, batch_id: str) -> int:
    counts = (
        OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0).batches.retrieve(batch_id).request_counts
    )
    assert counts is not None
    return counts.completed


def rows_of(sdk: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in sdk.files.content(file_id).content.splitlines()]


def ledger(storage: Storage, batch_id: str) -> tuple[int, int]:
    db = storage.open()
    try:
        with db.transaction(write=False) as tx:
            ((records, tokens),) = tx.fetchall(
                "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0) FROM usage_records WHERE batch_id = ?",
                (batch_id,),
            )
    finally:
        db.close()
    return int(records), int(tokens)


def driver_alive(batch_id: str) -> bool:
    import ray

    try:
        ray.get_actor(driver_name(batch_id), namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def check_exactly_once(base: str, batch_id: str, storage: Storage, lines: int) -> list[dict[str, Any]]:
    """The batch completes with every line once, billed once. -> its output rows."""
    sdk = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    wait_until(lambda: sdk.batches.retrieve(batch_id).status == "completed", "the batch completed")
    batch = sdk.batches.retrieve(batch_id)
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (lines, 0)
    rows = rows_of(sdk, batch.output_file_id)
    assert sorted(row["custom_id"] for row in rows) == sorted(f"line-{i}" for i in range(lines))
    tokens = sum(row["response"]["body"]["usage"]["prompt_tokens"] for row in rows)
    assert batch.usage is not None and batch.usage.input_tokens == tokens
    assert ledger(storage, batch_id) == (lines, tokens)
    # The job is done with: its actor ended, its shards and plan removed.
    wait_until(lambda: not driver_alive(batch_id), "the batch's driver ended")
    assert not (storage.data_dir / "files" / "ray-batches" / batch_id).exists()
    return rows


def check_vectors(base: str, rows: list[dict[str, Any]], every: int) -> None:
    for row in rows[::every]:
        index = int(row["custom_id"].removeprefix("line-"))
        online = httpx.post(f"{base}/v1/embeddings", json={"model": MODEL, "input": TEXT.format(i=index)})
        np.testing.assert_allclose(
            row["response"]["body"]["data"][0]["embedding"], online.json()["data"][0]["embedding"], atol=1e-6
        )


@pytest.mark.parametrize("storage", ["sqlite"], indirect=True)
def test_a_batch_on_ray_completes_with_the_online_routes_vectors_and_errors(
    storage: Storage, ray_address: str, tmp_path: Path
) -> None:
    """Through a batch store given as a URI: the server stages the input there for the cluster."""
    lines = 100
    corpus = [request(i) for i in range(lines)]
    corpus[7] = request(7, {"model": MODEL, "input": ""})  # the route refuses it: the error file says so
    corpus[9] = request(9, {"model": MODEL, "input": [TEXT.format(i=9), "a second input"]})
    store = tmp_path / "store"
    with serving(storage, ray_address, "--batch-store", store.as_uri()) as (base, _):
        batch_id = submit(base, corpus)
        sdk = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        wait_until(lambda: (store / batch_id / "input.jsonl").exists(), "the input was staged")
        wait_until(lambda: sdk.batches.retrieve(batch_id).status == "completed", "the batch completed")
        batch = sdk.batches.retrieve(batch_id)
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (lines - 1, 1)
        rows, errors = rows_of(sdk, batch.output_file_id), rows_of(sdk, batch.error_file_id)
        ids = sorted(row["custom_id"] for row in rows + errors)
        assert ids == sorted(f"line-{i}" for i in range(lines))
        check_vectors(base, [row for row in rows if row["custom_id"] != "line-9"], every=10)
        (two,) = [row for row in rows if row["custom_id"] == "line-9"]
        online = httpx.post(f"{base}/v1/embeddings", json=corpus[9]["body"]).json()
        assert [d["index"] for d in two["response"]["body"]["data"]] == [0, 1]
        np.testing.assert_allclose(
            [d["embedding"] for d in two["response"]["body"]["data"]],
            [d["embedding"] for d in online["data"]],
            atol=1e-6,
        )
        assert two["response"]["body"]["usage"] == online["usage"]
        (refused,) = errors
        answer = httpx.post(f"{base}/v1/embeddings", json=corpus[7]["body"])
        assert refused["custom_id"] == "line-7"
        assert refused["response"]["status_code"] == answer.status_code == 400
        assert refused["response"]["body"]["error"] == answer.json()["error"]
        tokens = sum(row["response"]["body"]["usage"]["prompt_tokens"] for row in rows)
        assert ledger(storage, batch_id) == (lines - 1, tokens)
        wait_until(lambda: not driver_alive(batch_id), "the batch's driver ended")
        assert not (store / batch_id).exists()
        assert not (storage.data_dir / "files" / "ray-batches").exists()


def test_a_server_killed_mid_job_commits_every_line_once_and_bills_it_once_after_restart(
    storage: Storage, ray_address: str
) -> None:
    lines = 320
    with serving(storage, ray_address) as (base, proc):
        batch_id = submit(base, [request(i) for i in range(lines)])
        wait_until(lambda: completed_count(base, batch_id) > 0, "the first shard was committed")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    assert driver_alive(batch_id), "the job died with the server"
    db = storage.open()
    try:
        with db.transaction(write=False) as tx:
            ((completed,),) = tx.fetchall("SELECT completed FROM batches WHERE id = ?", (batch_id,))
    finally:
        db.close()
    assert 0 < completed < lines, "the server was not killed mid-job"
    with serving(storage, ray_address) as (base, _):
        rows = check_exactly_once(base, batch_id, storage, lines)
        check_vectors(base, rows, every=lines // 5)


@pytest.mark.parametrize("storage", ["sqlite"], indirect=True)
def test_sigterm_leaves_the_job_running_and_a_job_gone_meanwhile_is_resubmitted_for_what_has_no_shard(
    storage: Storage, ray_address: str
) -> None:
    import ray

    lines = 320
    with serving(storage, ray_address) as (base, proc):
        batch_id = submit(base, [request(i) for i in range(lines)])
        wait_until(lambda: completed_count(base, batch_id) > 0, "the first shard was committed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert driver_alive(batch_id), "SIGTERM stopped the job"
    # The job goes too, before the server is back: the next start runs the ranges without a shard.
    ray.kill(ray.get_actor(driver_name(batch_id), namespace=NAMESPACE), no_restart=True)
    wait_until(lambda: not driver_alive(batch_id), "the job was killed")
    with serving(storage, ray_address) as (base, _):
        check_exactly_once(base, batch_id, storage, lines)


@pytest.mark.parametrize("storage", ["sqlite"], indirect=True)
def test_a_cancel_mid_job_stops_the_job_and_writes_off_the_lines_not_committed(
    storage: Storage, ray_address: str
) -> None:
    lines = 320
    with serving(storage, ray_address) as (base, _):
        sdk = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        batch_id = submit(base, [request(i) for i in range(lines)])
        wait_until(lambda: completed_count(base, batch_id) > 0, "the first shard was committed")
        assert sdk.batches.cancel(batch_id).status in ("cancelling", "cancelled")
        wait_until(lambda: sdk.batches.retrieve(batch_id).status == "cancelled", "the batch was cancelled")
        wait_until(lambda: not driver_alive(batch_id), "the job was stopped")
        batch = sdk.batches.retrieve(batch_id)
        assert batch.request_counts is not None
        done, written_off = batch.request_counts.completed, batch.request_counts.failed
        assert done + written_off == lines and 0 < done < lines
        rows, errors = rows_of(sdk, batch.output_file_id), rows_of(sdk, batch.error_file_id)
        assert sorted(row["custom_id"] for row in rows + errors) == sorted(f"line-{i}" for i in range(lines))
        assert {row["error"]["code"] for row in errors} == {"batch_cancelled"}
        tokens = sum(row["response"]["body"]["usage"]["prompt_tokens"] for row in rows)
        assert ledger(storage, batch_id) == (done, tokens)
        assert not (storage.data_dir / "files" / "ray-batches" / batch_id).exists()
