"""A batch survives its server, on SQLite and PostgreSQL: killed (SIGKILL) or stopped (SIGTERM) mid-run, the
next start resumes it where it was, and in the end every custom_id is in the output or error file exactly
once, the ledger holds exactly the output's usage, and each vector is the one /v1/embeddings gives (the
real bundled model, a real `embedserve serve` process)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from conftest import Storage
from gates import wait_until
from support import server_process

MODEL = "all-MiniLM-L6-v2"
LINES = 1500
TEXT = "the line {i} of a corpus that is long enough to take the model a while to get through, " * 2


@contextmanager
def serving(storage: Storage) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    flags = ["--data-dir", str(storage.data_dir)]
    if storage.url is not None:
        flags += ["--database-url", storage.url]
    with server_process(*flags) as server:
        yield server.base, server.proc


def corpus() -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, "input": TEXT.format(i=i)},
        }
        for i in range(LINES)
    ]


def stop_mid_run(base: str, proc: subprocess.Popen[bytes], how: signal.Signals) -> str:
    """Submit the corpus, let some lines commit, then send `how`. -> the batch id."""
    sdk = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    data = b"".join(json.dumps(line).encode() + b"\n" for line in corpus())
    uploaded = sdk.files.create(file=("corpus.jsonl", data), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    seen: list[int] = []

    def some_done() -> bool:
        counts = sdk.batches.retrieve(batch.id).request_counts
        assert counts is not None
        seen.append(counts.completed)
        return counts.completed > 0

    wait_until(some_done, "the first lines were committed")
    proc.send_signal(how)
    assert proc.wait(60) == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    assert 0 < seen[-1] < LINES, "the batch was not stopped mid-run"
    return batch.id


def check_exactly_once(base: str, batch_id: str, storage: Storage) -> None:
    sdk = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    wait_until(lambda: sdk.batches.retrieve(batch_id).status == "completed", "the batch completed")
    batch = sdk.batches.retrieve(batch_id)
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (LINES, 0)
    assert batch.error_file_id is None
    rows = [json.loads(line) for line in sdk.files.content(batch.output_file_id).content.splitlines()]
    ids = [row["custom_id"] for row in rows]
    assert sorted(ids) == sorted(f"line-{i}" for i in range(LINES))  # each once: none lost, none twice
    output_tokens = sum(row["response"]["body"]["usage"]["prompt_tokens"] for row in rows)
    assert batch.usage is not None and batch.usage.input_tokens == output_tokens
    db = storage.open()
    try:
        with db.transaction(write=False) as tx:
            ((records, tokens),) = tx.fetchall(
                "SELECT COUNT(*), SUM(prompt_tokens) FROM usage_records WHERE batch_id = ?", (batch_id,)
            )
    finally:
        db.close()
    assert (records, tokens) == (LINES, output_tokens)
    for row in rows[:: LINES // 5]:
        index = int(row["custom_id"].removeprefix("line-"))
        online = httpx.post(f"{base}/v1/embeddings", json={"model": MODEL, "input": TEXT.format(i=index)})
        np.testing.assert_allclose(
            row["response"]["body"]["data"][0]["embedding"], online.json()["data"][0]["embedding"], atol=1e-6
        )


def test_a_batch_killed_mid_run_resumes_on_restart_with_every_line_once_and_billed_once(
    storage: Storage,
) -> None:
    with serving(storage) as (base, proc):
        batch_id = stop_mid_run(base, proc, signal.SIGKILL)
    with serving(storage) as (base, _):
        check_exactly_once(base, batch_id, storage)


@pytest.mark.parametrize("storage", ["sqlite"], indirect=True)
def test_sigterm_stops_taking_lines_and_the_next_start_finishes_the_batch(storage: Storage) -> None:
    with serving(storage) as (base, proc):
        batch_id = stop_mid_run(base, proc, signal.SIGTERM)
    db = storage.open()
    try:
        with db.transaction(write=False) as tx:
            ((status, completed),) = tx.fetchall(
                "SELECT status, completed FROM batches WHERE id = ?", (batch_id,)
            )
    finally:
        db.close()
    assert status == "in_progress" and 0 < completed < LINES
    with serving(storage) as (base, _):
        check_exactly_once(base, batch_id, storage)
