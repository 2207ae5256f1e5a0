"""OpenAI's Batch API on the whole app (fake backends: real tokenizers, pipeline, keys, ledger and database;
deterministic vectors), through the official SDK: a batch runs every line as its owner's own
POST /v1/embeddings would, keeps bad lines to the error file, fails validation naming each line, can be
cancelled or expire with its output so far, is billed once per line at the batch price, and is another
key's 404."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from embedserve import Settings
from embedserve.backends.fake import fake_backends
from gates import ONE, Gate, wait_until
from support import LiveServer, live_server, private_data_dir

MODEL = "all-MiniLM-L6-v2"
ADMIN = "sk-batch-admin"
ALICE = "sk-batch-alice"
BOB = "sk-batch-bob"
PRICE = 2.0  # per million input tokens online; a batch line is billed half


def models_file(folder: Path) -> Path:
    path = folder / "models.toml"
    path.write_text(
        f'[[models]]\nsource = "{MODEL}"\nprice_per_million_input_tokens = {PRICE}\n', encoding="utf-8"
    )
    return path


def batch_settings(folder: Path, **overrides: Any) -> Settings:
    return Settings(
        data_dir=private_data_dir(folder / "data"),
        models_file=models_file(folder),
        api_keys=[ALICE, BOB],
        admin_keys=[ADMIN],
        usage_flush_interval=0.05,
        **overrides,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(batch_settings(tmp_path_factory.mktemp("batches")), backends=fake_backends()) as live:
        yield live


def client(live: LiveServer, key: str = ALICE) -> OpenAI:
    return OpenAI(base_url=live.v1, api_key=key, max_retries=0)


def request_line(custom_id: str, body: dict[str, Any], url: str = "/v1/embeddings") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def submit(live: LiveServer, lines: list[Any], key: str = ALICE, **create: Any) -> str:
    sdk = client(live, key)
    uploaded = sdk.files.create(file=("batch.jsonl", jsonl(lines), "application/jsonl"), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h", **create
    )
    assert batch.status == "validating"
    return batch.id


def finished(live: LiveServer, batch_id: str, key: str = ALICE) -> Any:
    sdk = client(live, key)
    ended = ("completed", "failed", "expired", "cancelled")
    wait_until(lambda: sdk.batches.retrieve(batch_id).status in ended, f"batch {batch_id} ended")
    return sdk.batches.retrieve(batch_id)


def lines_of(live: LiveServer, file_id: str | None, key: str = ALICE) -> dict[str, dict[str, Any]]:
    """A batch output or error file, by custom_id (each must appear once)."""
    if file_id is None:
        return {}
    rows = [json.loads(line) for line in client(live, key).files.content(file_id).content.splitlines()]
    by_id = {row["custom_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a custom_id appears twice"
    return by_id


def embeddings_answer(live: LiveServer, body: dict[str, Any], key: str = ALICE) -> httpx.Response:
    return httpx.post(f"{live.v1}/embeddings", json=body, headers={"Authorization": f"Bearer {key}"})


def test_each_line_is_answered_exactly_as_its_own_embeddings_request(server: LiveServer) -> None:
    bodies = {
        "one": {"model": MODEL, "input": "a single text"},
        "many": {"model": MODEL, "input": ["first of three", "second", "the third and longest of them"]},
        "b64": {"model": MODEL, "input": "base64 please", "encoding_format": "base64"},
        "ids": {"model": MODEL, "input": [[101, 7592, 2088, 102]]},
    }
    batch_id = submit(server, [request_line(k, v) for k, v in bodies.items()], metadata={"job": "t1"})
    batch = finished(server, batch_id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        4,
        4,
        0,
    )
    assert batch.metadata == {"job": "t1"} and batch.model == MODEL and batch.error_file_id is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    output = lines_of(server, batch.output_file_id)
    assert set(output) == set(bodies)
    tokens = 0
    for custom_id, body in bodies.items():
        row = output[custom_id]
        assert row["id"].startswith("batch_req_") and row["error"] is None
        assert row["response"]["status_code"] == 200 and row["response"]["request_id"]
        online = embeddings_answer(server, body).json()
        got = row["response"]["body"]
        assert got["usage"] == online["usage"] and got["model"] == online["model"]
        for mine, theirs in zip(got["data"], online["data"], strict=True):
            if isinstance(theirs["embedding"], str):
                assert mine["embedding"] == theirs["embedding"]
            else:
                np.testing.assert_array_equal(np.float32(mine["embedding"]), np.float32(theirs["embedding"]))
        tokens += got["usage"]["prompt_tokens"]
    assert batch.usage is not None and batch.usage.input_tokens == tokens
    meta = client(server).files.retrieve(batch.output_file_id)
    assert meta.purpose == "batch_output" and meta.filename == f"{batch_id}_output.jsonl"


def test_bad_lines_go_to_the_error_file_with_the_answer_the_route_gives_and_the_rest_complete(
    server: LiveServer,
) -> None:
    bodies = {
        "good": {"model": MODEL, "input": "fine"},
        # Of one kind with its neighbours (they run as one call): its error still names its own index.
        "long": {"model": MODEL, "input": ["short", "word " * 1000]},
        "good-too": {"model": MODEL, "input": ["also fine", "and this"]},
        "empty": {"model": MODEL, "input": ""},
        "unknown-model": {"model": "no-such-model", "input": "x"},
        "bad-type": {"model": MODEL, "input": [1.5]},
        "dims": {"model": MODEL, "input": "x", "dimensions": 8},
    }
    batch = finished(server, submit(server, [request_line(k, v) for k, v in bodies.items()]))
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 5)
    assert set(lines_of(server, batch.output_file_id)) == {"good", "good-too"}
    errors = lines_of(server, batch.error_file_id)
    assert set(errors) == set(bodies) - {"good", "good-too"}
    assert errors["long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    for custom_id, row in errors.items():
        online = embeddings_answer(server, bodies[custom_id])
        assert row["response"]["status_code"] == online.status_code >= 400
        assert row["response"]["body"] == online.json()
        assert row["error"] is None
    assert embeddings_answer(server, bodies["good"]).status_code == 200  # still serving


def test_a_malformed_file_fails_validation_naming_each_line_and_runs_nothing(server: LiveServer) -> None:
    lines: list[Any] = [
        request_line("ok", {"model": MODEL, "input": "fine"}),
        b"{not json",
        {"method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": "x"}},
        request_line("ok", {"model": MODEL, "input": "again"}),
        request_line("chat", {"model": MODEL, "input": "x"}, url="/v1/chat/completions"),
        {**request_line("get", {"model": MODEL, "input": "x"}), "method": "GET"},
        [1, 2, 3],
    ]
    batch = finished(server, submit(server, lines))
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors is not None and batch.errors.data is not None
    found = {(e.line, e.code) for e in batch.errors.data}
    assert found == {
        (2, "invalid_json_line"),
        (3, "missing_custom_id"),
        (4, "duplicate_custom_id"),
        (5, "invalid_url"),
        (6, "invalid_method"),
        (7, "invalid_json_line"),
    }
    assert all(e.message and str(e.line) in e.message for e in batch.errors.data)
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.request_counts is not None and batch.request_counts.completed == 0


@pytest.mark.parametrize(
    ("create", "status", "code", "param"),
    [
        ({"endpoint": "/v1/chat/completions"}, 400, "invalid_value", "endpoint"),
        ({"completion_window": "1h"}, 400, "invalid_value", "completion_window"),
        ({"input_file_id": None}, 400, "missing_required_parameter", "input_file_id"),
        ({"input_file_id": "file-0000000000000000nothere"}, 404, "file_not_found", None),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "invalid_value", "metadata"),
        ({"metadata": {"k": 5}}, 400, "invalid_type", "metadata"),
        ({"surprise": 1}, 400, "invalid_value", "surprise"),
    ],
)
def test_a_bad_create_is_refused_before_anything_is_stored(
    server: LiveServer, create: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    sdk = client(server)
    uploaded = sdk.files.create(
        file=("b.jsonl", jsonl([request_line("a", {"model": MODEL, "input": "x"})])), purpose="batch"
    )
    before = [b.id for b in sdk.batches.list(limit=100)]
    body = {"input_file_id": uploaded.id, "endpoint": "/v1/embeddings", "completion_window": "24h", **create}
    body = {k: v for k, v in body.items() if v is not None}
    answer = httpx.post(f"{server.v1}/batches", json=body, headers={"Authorization": f"Bearer {ALICE}"})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["code"] == code and error["message"]
    if param is not None:
        assert error["param"] == param
    assert [b.id for b in sdk.batches.list(limit=100)] == before
    assert embeddings_answer(server, {"model": MODEL, "input": "still serving"}).status_code == 200


def test_another_keys_batches_and_files_are_not_found_and_admins_see_all(server: LiveServer) -> None:
    batch_id = submit(server, [request_line("a", {"model": MODEL, "input": "mine"})])
    batch = finished(server, batch_id)
    bob = client(server, BOB)
    for call in (
        lambda: bob.batches.retrieve(batch_id),
        lambda: bob.batches.cancel(batch_id),
        lambda: bob.files.retrieve(batch.output_file_id),
        lambda: bob.files.content(batch.output_file_id),
        lambda: bob.files.retrieve(batch.input_file_id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch_id not in [b.id for b in bob.batches.list(limit=100)]
    admin = client(server, ADMIN)
    assert admin.batches.retrieve(batch_id).id == batch_id
    assert batch_id in [b.id for b in admin.batches.list(limit=100)]
    assert lines_of(server, batch.output_file_id, key=ADMIN).keys() == {"a"}


def test_batches_list_newest_first_in_cursor_pages(server: LiveServer) -> None:
    ids = [
        submit(server, [request_line("a", {"model": MODEL, "input": f"page {i}"})], key=BOB) for i in range(3)
    ]
    bob = client(server, BOB)
    first = bob.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    assert [b.id for b in bob.batches.list(limit=2)] == ids[::-1]  # the SDK follows `after`
    raw = httpx.get(f"{server.v1}/batches", params={"limit": 2}, headers={"Authorization": f"Bearer {BOB}"})
    page = raw.json()
    assert page["object"] == "list" and page["first_id"] == ids[2] and page["last_id"] == ids[1]
    for bad in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"order": "asc"}):
        answer = httpx.get(f"{server.v1}/batches", params=bad, headers={"Authorization": f"Bearer {BOB}"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] in bad


def test_each_successful_line_is_billed_once_at_the_batch_price_and_tagged_with_the_batch(
    server: LiveServer,
) -> None:
    batch = finished(
        server,
        submit(
            server,
            [request_line(f"l{i}", {"model": MODEL, "input": f"bill {i}"}) for i in range(5)]
            + [request_line("bad", {"model": MODEL, "input": ""})],
        ),
    )
    assert batch.usage is not None
    state = server.state
    with state.db.transaction(write=False) as tx:
        rows = tx.fetchall(
            "SELECT prompt_tokens, inputs, price_per_million, record_id FROM usage_records "
            "WHERE batch_id = ?",
            (batch.id,),
        )
    assert len(rows) == 5
    assert sum(r[0] for r in rows) == batch.usage.input_tokens
    assert {r[2] for r in rows} == {PRICE / 2}
    assert len({r[3] for r in rows}) == 5
    usage = httpx.get(
        f"{server.v1}/usage", params={"group_by": "batch"}, headers={"Authorization": f"Bearer {ADMIN}"}
    ).json()
    (row,) = [r for r in usage["data"] if r["batch_id"] == batch.id]
    assert (row["requests"], row["prompt_tokens"]) == (5, batch.usage.input_tokens)
    assert row["cost"] == pytest.approx(batch.usage.input_tokens * PRICE / 2 / 1_000_000)


def test_cancel_stops_taking_lines_and_keeps_what_is_done(tmp_path: Path, gate: Gate) -> None:
    settings = batch_settings(tmp_path, **ONE)
    with live_server(settings, backends=gate.backends(fake_backends())) as live:
        gate.armed = True
        total = 700  # more lines than the runner keeps in the engine at once
        batch_id = submit(
            live, [request_line(f"c{i}", {"model": MODEL, "input": f"cancel {i}"}) for i in range(total)]
        )
        assert gate.entered.wait(60)
        cancelling = client(live).batches.cancel(batch_id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        gate.opened.set()
        batch = finished(live, batch_id)
        assert batch.status == "cancelled" and batch.cancelled_at
        output, errors = lines_of(live, batch.output_file_id), lines_of(live, batch.error_file_id)
        assert output and errors and not set(output) & set(errors)
        assert set(output) | set(errors) == {f"c{i}" for i in range(total)}
        assert {row["error"]["code"] for row in errors.values()} == {"batch_cancelled"}
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (len(output), len(errors))
        again = client(live).batches.cancel(batch_id)  # cancelling a cancelled batch answers it as it is
        assert again.status == "cancelled"
        done = finished(live, submit(live, [request_line("x", {"model": MODEL, "input": "x"})]))
        answer = httpx.post(
            f"{live.v1}/batches/{done.id}/cancel", headers={"Authorization": f"Bearer {ALICE}"}
        )
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "conflict"


def test_a_batch_past_its_window_expires_with_its_completed_lines_output(tmp_path: Path, gate: Gate) -> None:
    settings = batch_settings(tmp_path, batch_window=3, **ONE)
    with live_server(settings, backends=gate.backends(fake_backends())) as live:
        gate.armed = True
        total = 700
        batch_id = submit(
            live, [request_line(f"e{i}", {"model": MODEL, "input": f"expire {i}"}) for i in range(total)]
        )
        assert gate.entered.wait(60)
        created = client(live).batches.retrieve(batch_id)
        wait_until(lambda: time.time() > created.expires_at + 0.5, "the window has passed")
        gate.opened.set()
        batch = finished(live, batch_id)
        assert batch.status == "expired" and batch.expired_at
        output, errors = lines_of(live, batch.output_file_id), lines_of(live, batch.error_file_id)
        assert output and errors
        assert set(output) | set(errors) == {f"e{i}" for i in range(total)}
        assert {row["error"]["code"] for row in errors.values()} == {"batch_expired"}


def test_a_key_over_its_queued_batch_tokens_fails_validation(tmp_path: Path) -> None:
    settings = batch_settings(tmp_path, batch_max_queued_tokens=500)
    with live_server(settings, backends=fake_backends()) as live:
        batch = finished(
            live,
            submit(live, [request_line(f"t{i}", {"model": MODEL, "input": "x" * 100}) for i in range(10)]),
        )
        assert batch.status == "failed"
        assert batch.errors is not None and batch.errors.data is not None
        assert [e.code for e in batch.errors.data] == ["token_limit_exceeded"]
        small = finished(live, submit(live, [request_line("s", {"model": MODEL, "input": "short"})]))
        assert small.status == "completed"


def test_batch_lines_never_spend_the_keys_requests_per_minute(tmp_path: Path) -> None:
    settings = batch_settings(tmp_path)
    with live_server(settings, backends=fake_backends()) as live:
        created = httpx.post(
            f"{live.v1}/keys", json={"name": "slow", "rpm": 2}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        key = created.json()["key"]
        batch = finished(
            live,
            submit(
                live,
                [request_line(f"r{i}", {"model": MODEL, "input": f"rpm {i}"}) for i in range(20)],
                key=key,
            ),
            key=key,
        )
        assert batch.status == "completed"
        assert batch.request_counts is not None and batch.request_counts.completed == 20
        for _ in range(2):  # the key's two requests of this minute are still there
            assert embeddings_answer(live, {"model": MODEL, "input": "online"}, key=key).status_code == 200


def test_the_sweeper_removes_expired_files_and_old_batches(tmp_path: Path) -> None:
    settings = batch_settings(tmp_path, file_expiry=3, sweep_interval=0.2)
    with live_server(settings, backends=fake_backends()) as live:
        batch = finished(live, submit(live, [request_line("s", {"model": MODEL, "input": "sweep me"})]))
        assert batch.status == "completed"
        sdk = client(live)

        def gone() -> bool:
            try:
                sdk.batches.retrieve(batch.id)
            except openai.NotFoundError:
                return True
            return False

        wait_until(gone, "the sweeper removed the batch")
        for file_id in (batch.output_file_id, batch.input_file_id):
            with pytest.raises(openai.NotFoundError):
                sdk.files.retrieve(file_id)
        assert sorted(p.name for p in settings.files_path.iterdir() if not p.name.startswith(".")) == []
