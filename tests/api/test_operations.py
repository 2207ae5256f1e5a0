"""What an operator sees: /metrics counters move by exactly the requests sent, every model's series are
listed from the start, and the access log carries the request's fields (never its text, never its
key)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from conftest import API_KEY
from embedserve.metrics import EMBEDDINGS_ROUTE, REJECT_REASONS, Metrics
from embedserve.settings import Settings
from gates import wait_until
from support import LiveServer, live_server

MODEL = "all-MiniLM-L6-v2"
ROUTE = "/v1/embeddings"


def scrape(live: LiveServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, keyed by (name, labels)."""
    response = httpx.get(f"{live.base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(
    before: dict[tuple[str, frozenset[tuple[str, str]]], float],
    after: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_counters_move_by_exactly_the_requests_sent(server: LiveServer, client: OpenAI) -> None:
    before = scrape(server)
    inputs = [
        ["alpha"],
        ["beta gamma", "delta epsilon zeta"],
        ["one", "two", "three", "four"],
        ["a much longer input that goes on for a while to make more tokens"],
        ["x"],
    ]
    tokens = 0
    for batch in inputs:
        tokens += client.embeddings.create(model=MODEL, input=batch).usage.prompt_tokens
    auth = {"Authorization": f"Bearer {API_KEY}"}
    bad = [
        {"model": MODEL, "input": ""},
        {"model": MODEL, "input": "x", "dimensions": 7},
        {"model": MODEL, "input": []},
    ]
    for body in bad:
        assert httpx.post(f"{server.v1}/embeddings", json=body, headers=auth).status_code == 400
    assert (
        httpx.post(f"{server.v1}/embeddings", json={"model": "nope", "input": "x"}, headers=auth).status_code
        == 404
    )
    assert httpx.post(f"{server.v1}/embeddings", json={"model": MODEL, "input": "x"}).status_code == 401
    after = scrape(server)

    sent = sum(len(batch) for batch in inputs)
    key = server.state.keys.authenticate(API_KEY).key_id  # the id the key ring gave it
    requests = "embedserve_requests_total"
    assert delta(before, after, requests, route=ROUTE, model=MODEL, status="200") == len(inputs)
    # A body refused by the shape checks never names a model the server resolved: label "-".
    assert delta(before, after, requests, route=ROUTE, model=MODEL, status="400") == 1  # dimensions
    assert delta(before, after, requests, route=ROUTE, model="-", status="400") == 2
    assert delta(before, after, requests, route=ROUTE, model="-", status="404") == 1  # no such model
    assert delta(before, after, requests, route=ROUTE, model="-", status="401") == 1  # before the body
    assert (
        delta(before, after, "embedserve_request_duration_seconds_count", route=ROUTE)
        == len(inputs) + len(bad) + 2
    )
    assert delta(before, after, "embedserve_embedded_tokens_total", model=MODEL, key_id=key) == tokens
    assert delta(before, after, "embedserve_embedded_inputs_total", model=MODEL, key_id=key) == sent
    # Every embedded input went through exactly one forward pass, and waited in the queue once.
    assert delta(before, after, "embedserve_batch_size_inputs_sum", model=MODEL) == sent
    assert delta(before, after, "embedserve_batch_tokens_sum", model=MODEL) == tokens
    assert delta(before, after, "embedserve_queue_wait_seconds_count", model=MODEL) == sent
    # The 400s above are all caught before tokenizing (shape checks, then dimensions).
    assert delta(before, after, "embedserve_tokenize_duration_seconds_count", model=MODEL) == len(inputs)


def test_gauges_report_each_model_the_queue_and_the_process(server: LiveServer) -> None:
    samples = scrape(server)
    for spec in server.state.engine.registry.catalog.specs:
        assert value(samples, "embedserve_model_ready", model=spec.id) == 1
        assert value(samples, "embedserve_model_load_seconds", model=spec.id) > 0
        assert ("embedserve_queue_depth_inputs", frozenset({("model", spec.id)})) in samples
    assert value(samples, "embedserve_queue_depth_inputs", model=MODEL) == 0
    assert value(samples, "embedserve_requests_in_flight") == 0
    assert value(samples, "embedserve_process_resident_memory_bytes") > 50 * 2**20
    assert all(name.startswith("embedserve_") for name, _ in samples)


def test_the_access_line_has_the_requests_fields_and_never_its_text_or_key(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    from embedserve.logs import JsonFormatter

    secret_text = "zebra-canary-7731 quietly"
    with caplog.at_level(logging.INFO, logger="embedserve.access"):
        response = httpx.post(
            f"{server.v1}/embeddings",
            json={"model": MODEL, "input": [secret_text, "b"]},
            headers={"Authorization": f"Bearer {API_KEY}", "X-Request-ID": "req-fields-1"},
        )
        assert response.status_code == 200

        # The access line is written once the response has gone out: the client may read it first.
        def logged() -> list[logging.LogRecord]:
            return [r for r in caplog.records if getattr(r, "request_id", None) == "req-fields-1"]

        wait_until(lambda: bool(logged()), "the request's access line is written")
    (record,) = logged()
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "request"
    assert line["request_id"] == "req-fields-1"
    assert line["route"] == ROUTE
    assert line["status"] == 200
    assert line["model"] == MODEL
    assert line["inputs"] == 2
    assert line["tokens"] == response.json()["usage"]["prompt_tokens"]
    assert line["key_id"] == server.state.keys.authenticate(API_KEY).key_id
    assert isinstance(line["latency_ms"], float)
    for name in ("ts", "level", "logger", "message"):
        assert line[name]
    text = JsonFormatter().format(record) + record.getMessage()
    assert "zebra-canary" not in text
    assert API_KEY not in text


# ---- series exist from the start ----------------------------------------------------------------------

#: (name, extra labels) of every series labelled with a model that a scrape must list before any request.
MODEL_SERIES = [
    *(
        (f"embedserve_{name}_count", {})
        for name in (
            "tokenize_duration_seconds",
            "queue_wait_seconds",
            "batch_queue_wait_seconds",
            "inference_duration_seconds",
            "batch_size_inputs",
            "batch_tokens",
        )
    ),
    ("embedserve_batch_padding_tokens_total", {}),
    ("embedserve_tokenized_tokens_total", {}),
    ("embedserve_queue_depth_inputs", {}),
    ("embedserve_batch_queue_depth_inputs", {}),
    ("embedserve_model_ready", {}),
    *(("embedserve_rejected_inputs_total", {"reason": reason}) for reason in REJECT_REASONS),
    ("embedserve_requests_total", {"route": ROUTE, "status": "200"}),
]


def test_every_model_labelled_series_is_listed_right_after_ready(
    tmp_path: Path, tiny_dense_model: Path
) -> None:
    catalog = tmp_path / "models.toml"
    catalog.write_text(
        f'[[models]]\nsource = "{MODEL}"\n\n[[models]]\nid = "tiny"\nsource = "{tiny_dense_model}"\n'
    )
    with live_server(Settings(models_file=catalog)) as live:  # returns once /ready is 200
        samples = scrape(live)
    for model in (MODEL, "tiny"):
        for name, labels in MODEL_SERIES:
            assert (name, frozenset({"model": model, **labels}.items())) in samples, (name, model)
        assert value(samples, "embedserve_model_ready", model=model) == 1
        assert value(samples, "embedserve_queue_depth_inputs", model=model) == 0
        assert value(samples, "embedserve_requests_total", route=ROUTE, model=model, status="200") == 0
        for reason in REJECT_REASONS:
            assert value(samples, "embedserve_rejected_inputs_total", model=model, reason=reason) == 0


def test_a_model_still_loading_is_listed_with_model_ready_0() -> None:
    from embedserve.catalog import build_catalog, declared_entries
    from embedserve.runtime import ModelRegistry

    metrics = Metrics()
    catalog = build_catalog(declared_entries([MODEL], None), allow_download=False)
    ModelRegistry(catalog, Settings(), metrics)  # created, nothing loaded yet
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }
    for name, labels in MODEL_SERIES:
        assert (name, frozenset({"model": MODEL, **labels}.items())) in samples, name
    assert value(samples, "embedserve_model_ready", model=MODEL) == 0


def test_the_metrics_name_the_route_that_serves_embeddings() -> None:
    from embedserve.api.routes import EMBEDDINGS_PATH

    assert EMBEDDINGS_ROUTE == EMBEDDINGS_PATH == ROUTE
