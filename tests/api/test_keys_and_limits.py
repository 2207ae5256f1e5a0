"""Managed API keys, per-key rate limits and usage on a live server: revoked and expired keys are 401,
changes land on the running server within a second, model-limited keys see only their models, only admin
keys manage keys and read usage (403 otherwise), limits answer 429 with OpenAI's type, code and headers
(and the official client's retry then succeeds), and only successful requests are billed."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from embedserve.db import open_database
from embedserve.keys import KeyChanges, KeyRecord, KeyStore, load_pepper
from embedserve.settings import Settings
from support import LiveServer, live_server, private_data_dir

MODEL = "all-MiniLM-L6-v2"
SMALL = "tiny-cls-dense"
PRICE = 0.13  # per million input tokens, of MODEL
STATIC = "sk-static-unlimited"
ADMIN = "sk-static-admin"
ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
RATE_HEADERS = {
    f"x-ratelimit-{what}-{kind}"
    for what in ("limit", "remaining", "reset")
    for kind in ("requests", "tokens")
}


@dataclass
class KeyedServer:
    live: LiveServer
    store: KeyStore
    pepper: bytes
    data_dir: Path

    def create(self, name: str, **fields: Any) -> tuple[KeyRecord, str]:
        """A new key, once the running server knows it."""
        record, secret = self.store.create(self.pepper, KeyChanges(name=name, **fields))
        wait_for(
            lambda: (
                get(self, "/v1/models", secret).status_code != 401
                or "Incorrect" not in get(self, "/v1/models", secret).text
            )
        )
        return record, secret


def wait_for(condition: Any, timeout_s: float = 3.0, step_s: float = 0.02) -> float:
    """Poll until `condition()`; -> seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError("condition not met in time")
        time.sleep(step_s)
    return time.monotonic() - started


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def get(server: KeyedServer, path: str, key: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(server.live.base_url + path, headers=auth(key), timeout=60, **kwargs)


def embed(server: KeyedServer, key: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.live.v1}/embeddings", headers=auth(key), json=body, timeout=60)


def ids(n: int) -> list[int]:
    """A token-id input of exactly n tokens ([CLS] ... [SEP])."""
    return [101, *([1000] * (n - 2)), 102]


def openai_error(
    response: httpx.Response, status: int, code: str, type_: str, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    assert (error["code"], error["type"], error["param"]) == (code, type_, param)
    assert error["message"]
    return error


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_dense_model: Path) -> Iterator[KeyedServer]:
    data_dir = private_data_dir(tmp_path_factory.mktemp("keyed") / "data")
    catalog = data_dir.parent / "models.toml"
    catalog.write_text(f"""
[[models]]
source = "{MODEL}"
price_per_million_input_tokens = {PRICE}

[[models]]
id = "{SMALL}"
source = "{tiny_dense_model}"
""")
    pepper = load_pepper(None, data_dir)  # the default pepper file, which the server reads too
    db = open_database(None, data_dir)
    settings = Settings(
        models_file=catalog,
        data_dir=data_dir,
        api_keys=[STATIC],
        admin_keys=[ADMIN],
        usage_flush_interval=0.2,
    )
    try:
        with live_server(settings) as live:
            yield KeyedServer(live=live, store=KeyStore(db), pepper=pepper, data_dir=data_dir)
    finally:
        db.close()


# ---- authentication -------------------------------------------------------------------------------


def test_a_managed_key_works_with_the_official_client(keyed: KeyedServer) -> None:
    _, secret = keyed.create("sdk")
    client = OpenAI(base_url=keyed.live.v1, api_key=secret, max_retries=0)
    result = client.embeddings.create(model=MODEL, input="hello world")
    assert len(result.data[0].embedding) == 384 and result.usage.prompt_tokens == 4


def test_a_revoked_key_is_401_invalid_api_key_saying_so(keyed: KeyedServer) -> None:
    record, secret = keyed.create("to-revoke")
    assert embed(keyed, secret, {"model": MODEL, "input": "x"}).status_code == 200
    keyed.store.revoke(record.id)
    wait_for(lambda: get(keyed, "/v1/models", secret).status_code == 401)
    response = embed(keyed, secret, {"model": MODEL, "input": "x"})
    error = openai_error(response, 401, "invalid_api_key", "invalid_request_error")
    assert "revoked" in error["message"] and record.prefix in error["message"]
    assert secret not in response.text


def test_an_expired_key_is_401_invalid_api_key_saying_when(keyed: KeyedServer) -> None:
    _, secret = keyed.create("expiring", expires_at=time.time() + 1.0)
    assert embed(keyed, secret, {"model": MODEL, "input": "x"}).status_code == 200
    wait_for(lambda: embed(keyed, secret, {"model": MODEL, "input": "x"}).status_code == 401, 3)
    error = openai_error(
        embed(keyed, secret, {"model": MODEL, "input": "x"}), 401, "invalid_api_key", "invalid_request_error"
    )
    assert "expired at" in error["message"]


def test_revoking_with_the_cli_lands_on_the_running_server_within_a_second(keyed: KeyedServer) -> None:
    record, secret = keyed.create("cli-revoked")
    assert get(keyed, "/v1/models", secret).status_code == 200
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedserve",
            "keys",
            "revoke",
            record.id,
            "--json",
            "--data-dir",
            str(keyed.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "revoked"
    took = wait_for(lambda: get(keyed, "/v1/models", secret).status_code == 401)
    assert took < 1.0


def test_a_changed_limit_lands_on_the_running_server_within_a_second(keyed: KeyedServer) -> None:
    record, secret = keyed.create("to-limit")
    assert not RATE_HEADERS & set(get(keyed, "/v1/models", secret).headers)
    keyed.store.update(record.id, KeyChanges(rpm=7))
    took = wait_for(lambda: "x-ratelimit-limit-requests" in get(keyed, "/v1/models", secret).headers)
    assert took < 1.0
    assert get(keyed, "/v1/models", secret).headers["x-ratelimit-limit-requests"] == "7"


def test_keys_and_secrets_never_reach_the_log_but_the_key_prefix_does(
    keyed: KeyedServer, caplog: pytest.LogCaptureFixture
) -> None:
    record, secret = keyed.create("logged")
    with caplog.at_level(logging.INFO, logger="embedserve"):
        embed(keyed, secret, {"model": MODEL, "input": "x"})
        embed(keyed, secret + "-wrong", {"model": MODEL, "input": "x"})
        wait_for(lambda: any(record.id in r.getMessage() for r in caplog.records))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"key_id={record.id} key_prefix={record.prefix}" in text
    assert secret not in text and secret[8:] not in text


# ---- models a key may use ---------------------------------------------------------------------------


def test_a_model_limited_key_gets_404_model_not_found_for_other_models(keyed: KeyedServer) -> None:
    _, secret = keyed.create("small-only", models=[SMALL])
    assert embed(keyed, secret, {"model": SMALL, "input": "x"}).status_code == 200
    refused = embed(keyed, secret, {"model": MODEL, "input": "x"})
    error = openai_error(refused, 404, "model_not_found", "invalid_request_error", "model")
    unknown = openai_error(
        embed(keyed, secret, {"model": "no-such-model", "input": "x"}),
        404,
        "model_not_found",
        "invalid_request_error",
        "model",
    )
    assert error["message"] == unknown["message"].replace("no-such-model", MODEL)  # reveals nothing
    assert f"Models you may use: {SMALL}." in error["message"]  # only the key's own
    openai_error(
        get(keyed, f"/v1/models/{MODEL}", secret), 404, "model_not_found", "invalid_request_error", "model"
    )
    assert get(keyed, f"/v1/models/{SMALL}", secret).status_code == 200


def test_a_model_limited_key_lists_only_its_models(keyed: KeyedServer) -> None:
    _, secret = keyed.create("listing", models=[SMALL])
    client = OpenAI(base_url=keyed.live.v1, api_key=secret, max_retries=0)
    assert [m.id for m in client.models.list()] == [SMALL]
    everything = OpenAI(base_url=keyed.live.v1, api_key=STATIC, max_retries=0)
    assert {m.id for m in everything.models.list()} == {MODEL, SMALL}


def test_a_key_may_name_a_model_by_an_alias(keyed: KeyedServer) -> None:
    _, secret = keyed.create("by-alias", models=["sentence-transformers/all-MiniLM-L6-v2"])
    assert embed(keyed, secret, {"model": MODEL, "input": "x"}).status_code == 200
    assert embed(keyed, secret, {"model": SMALL, "input": "x"}).status_code == 404


# ---- admin routes -----------------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys/key_x"),
    ("PATCH", "/v1/keys/key_x"),
    ("DELETE", "/v1/keys/key_x"),
    ("GET", "/v1/usage"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_ordinary_keys_get_403_permission_denied_on_management_and_usage_routes(
    keyed: KeyedServer, method: str, path: str
) -> None:
    _, managed = keyed.create(f"ordinary {method} {path}")
    for key in (managed, STATIC):
        response = httpx.request(
            method, keyed.live.base_url + path, headers=auth(key), json={"name": "sneaky", "admin": True}
        )
        error = openai_error(response, 403, "permission_denied", "invalid_request_error")
        assert "admin" in error["message"]
    assert not any(r.name == "sneaky" for r in keyed.store.list_keys())


def test_management_routes_without_a_key_are_401(keyed: KeyedServer) -> None:
    openai_error(httpx.get(f"{keyed.live.v1}/keys"), 401, "invalid_api_key", "invalid_request_error")


def test_an_admin_key_creates_updates_and_revokes_keys_over_http(keyed: KeyedServer) -> None:
    created = httpx.post(
        f"{keyed.live.v1}/keys",
        headers=auth(ADMIN),
        json={"name": "over-http", "models": [MODEL], "rpm": 100},
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {
        "id",
        "object",
        "key",
        "name",
        "prefix",
        "models",
        "rpm",
        "tpm",
        "expires_at",
        "admin",
        "created_at",
        "revoked_at",
        "status",
    }
    assert body["key"].startswith(body["prefix"]) and body["status"] == "active"
    secret, key_id = body["key"], body["id"]
    # this replica applies its own changes at once
    assert embed(keyed, secret, {"model": MODEL, "input": "x"}).status_code == 200
    shown = get(keyed, f"/v1/keys/{key_id}", ADMIN).json()
    assert shown == {k: v for k, v in body.items() if k != "key"}
    listed = get(keyed, "/v1/keys", ADMIN).json()
    assert listed["object"] == "list" and key_id in {k["id"] for k in listed["data"]}
    assert secret not in json.dumps(listed)
    patched = httpx.patch(
        f"{keyed.live.v1}/keys/{key_id}",
        headers=auth(ADMIN),
        json={"rpm": None, "tpm": 5000, "models": None, "admin": True},
    )
    assert patched.status_code == 200
    assert (
        patched.json()["rpm"],
        patched.json()["tpm"],
        patched.json()["models"],
        patched.json()["admin"],
    ) == (None, 5000, None, True)
    assert get(keyed, "/v1/usage", secret).status_code == 200  # it is an admin now
    revoked = httpx.delete(f"{keyed.live.v1}/keys/{key_id}", headers=auth(ADMIN))
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert embed(keyed, secret, {"model": MODEL, "input": "x"}).status_code == 401


def test_a_managed_admin_key_may_call_the_admin_routes(keyed: KeyedServer) -> None:
    _, secret = keyed.create("managed-admin", admin=True)
    assert get(keyed, "/v1/keys", secret).status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "name", "missing_required_parameter"),
        ({"name": "x", "rpm": 0}, "rpm", "invalid_type"),
        ({"name": "x", "models": "m"}, "models", "invalid_type"),
        ({"name": "x", "expires_at": "soon"}, "expires_at", "invalid_value"),
        ({"name": "x", "colour": "red"}, "colour", "invalid_value"),
        ([], None, "invalid_type"),
    ],
)
def test_bad_key_bodies_are_400_naming_the_field(
    keyed: KeyedServer, body: Any, param: str | None, code: str
) -> None:
    response = httpx.post(f"{keyed.live.v1}/keys", headers=auth(ADMIN), json=body)
    openai_error(response, 400, code, "invalid_request_error", param)


OUT_OF_RANGE = [
    "9999-12-31T23:00:00-05:00",
    "99999999999999999999999d",
    "999999999d",
    "9999-12-31T23:59:59-12:00",
    "0001-01-01T00:00:00+14:00",
    "1969-12-31T23:59:59Z",
    "9" * 5000 + "d",
]
TIME_RANGE = "1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z"


def still_serves(keyed: KeyedServer) -> None:
    listed = get(keyed, "/v1/keys", ADMIN)
    assert listed.status_code == 200, listed.text
    for key in listed.json()["data"]:
        assert key["expires_at"] is None or ISO_TIME.match(key["expires_at"]), key
    assert get(keyed, "/v1/usage", ADMIN).status_code == 200
    assert embed(keyed, STATIC, {"model": MODEL, "input": "x"}).status_code == 200


@pytest.mark.parametrize("when", OUT_OF_RANGE)
def test_a_new_key_expiring_outside_1970_to_9999_is_400_naming_the_range_and_is_not_created(
    keyed: KeyedServer, when: str
) -> None:
    name = f"out-of-range {when[:30]}"
    version = keyed.store.version()
    response = httpx.post(
        f"{keyed.live.v1}/keys", headers=auth(ADMIN), json={"name": name, "expires_at": when}
    )
    error = openai_error(response, 400, "invalid_value", "invalid_request_error", "expires_at")
    assert TIME_RANGE in error["message"]
    assert keyed.store.version() == version
    assert not any(record.name == name for record in keyed.store.list_keys())
    still_serves(keyed)


@pytest.mark.parametrize("when", OUT_OF_RANGE[:3])
def test_changing_an_expiry_to_outside_the_range_is_400_and_changes_nothing(
    keyed: KeyedServer, when: str
) -> None:
    record, _ = keyed.create(f"kept {when[:30]}", expires_at=2e9)
    response = httpx.patch(
        f"{keyed.live.v1}/keys/{record.id}", headers=auth(ADMIN), json={"expires_at": when, "rpm": 5}
    )
    error = openai_error(response, 400, "invalid_value", "invalid_request_error", "expires_at")
    assert TIME_RANGE in error["message"]
    assert keyed.store.get(record.id) == record
    still_serves(keyed)


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("since=9999-12-31T23:59:59-12:00", "since"),
        ("since=0001-01-01T00:00:00%2B14:00", "since"),
        ("until=9999-12-31T23:00:00-05:00", "until"),
        ("since=2025-01-01&until=0001-01-01T00:00:00%2B14:00", "until"),
    ],
)
def test_a_usage_window_outside_1970_to_9999_is_400_naming_the_parameter_and_the_range(
    keyed: KeyedServer, query: str, param: str
) -> None:
    error = openai_error(
        get(keyed, f"/v1/usage?{query}", ADMIN), 400, "invalid_value", "invalid_request_error", param
    )
    assert TIME_RANGE in error["message"]
    still_serves(keyed)


def test_an_unknown_key_id_is_404_key_not_found(keyed: KeyedServer) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        response = httpx.request(
            method, f"{keyed.live.v1}/keys/key_nope", headers=auth(ADMIN), json={"rpm": 3}
        )
        openai_error(response, 404, "key_not_found", "invalid_request_error", "id")


@pytest.mark.parametrize(
    ("query", "param", "code"),
    [
        ("since=yesterday", "since", "invalid_value"),
        ("until=2025-02-30", "until", "invalid_value"),
        ("group_by=month", "group_by", "invalid_value"),
        ("group-by=key", "group-by", "invalid_value"),
        ("key=", "key", "invalid_type"),
        ("since=2025-02-01&until=2025-01-01", "until", "invalid_value"),
    ],
)
def test_bad_usage_query_parameters_are_400_never_422(
    keyed: KeyedServer, query: str, param: str, code: str
) -> None:
    response = get(keyed, f"/v1/usage?{query}", ADMIN)
    openai_error(response, 400, code, "invalid_request_error", param)


# ---- rate limits -----------------------------------------------------------------------------------


def test_over_the_request_limit_is_429_type_requests_with_retry_after(keyed: KeyedServer) -> None:
    _, secret = keyed.create("rpm-2", rpm=2)
    for _ in range(2):
        assert embed(keyed, secret, {"model": MODEL, "input": "x"}).status_code == 200
    refused = embed(keyed, secret, {"model": MODEL, "input": "x"})
    error = openai_error(refused, 429, "rate_limit_exceeded", "requests")
    assert "2 requests per minute" in error["message"]
    assert 28 <= int(refused.headers["retry-after"]) <= 30  # one request every 30 s
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    sdk = OpenAI(base_url=keyed.live.v1, api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.embeddings.create(model=MODEL, input="x")
    assert caught.value.type == "requests" and caught.value.code == "rate_limit_exceeded"


def test_over_the_token_limit_is_429_type_tokens_before_the_model_runs(keyed: KeyedServer) -> None:
    _, secret = keyed.create("tpm-100", tpm=100)
    ok = embed(keyed, secret, {"model": MODEL, "input": [ids(60)]})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 60
    refused = embed(keyed, secret, {"model": MODEL, "input": [ids(50)]})
    error = openai_error(refused, 429, "rate_limit_exceeded", "tokens")
    assert "50 tokens" in error["message"]
    assert 0 < float(refused.headers["retry-after-ms"]) / 1000 <= 6.1  # 10 tokens at 100/min
    assert refused.headers["x-ratelimit-limit-tokens"] == "100"
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) in (40, 41)


def test_a_request_larger_than_the_key_token_limit_is_429_that_the_sdk_does_not_retry(
    keyed: KeyedServer,
) -> None:
    _, secret = keyed.create("tpm-20", tpm=20)
    sdk = OpenAI(base_url=keyed.live.v1, api_key=secret)  # default retries
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.embeddings.create(model=MODEL, input=[ids(30)])
    assert time.monotonic() - started < 0.4  # refused at once, no retries
    assert caught.value.type == "tokens"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "Split" in caught.value.message


def test_the_official_client_retry_succeeds_once_the_window_allows_it(
    keyed: KeyedServer, caplog: pytest.LogCaptureFixture
) -> None:
    record, secret = keyed.create("tpm-600", tpm=600)  # 10 tokens per second
    no_retries = OpenAI(base_url=keyed.live.v1, api_key=secret, max_retries=0)
    retrying = OpenAI(base_url=keyed.live.v1, api_key=secret)  # the SDK's defaults: 2 retries
    assert embed(keyed, secret, {"model": MODEL, "input": [ids(200)] * 3}).status_code == 200
    # The bucket refills from the moment the 600 tokens were taken (before the model ran): a request
    # of 20 tokens waits 2 s minus however long that first request took.
    with pytest.raises(openai.RateLimitError) as caught:
        no_retries.embeddings.create(model=MODEL, input=[ids(20)])
    assert 0 < int(caught.value.response.headers["retry-after-ms"]) <= 2000
    with caplog.at_level(logging.INFO, logger="embedserve.access"):
        started = time.monotonic()
        result = retrying.embeddings.create(model=MODEL, input=[ids(20)])
        waited = time.monotonic() - started
        wait_for(
            lambda: any(" 200 " in r.getMessage() and record.id in r.getMessage() for r in caplog.records)
        )
    assert result.usage.prompt_tokens == 20
    assert 0.2 <= waited < 5  # it waited for the window (about a second), then succeeded
    statuses = [
        r.getMessage().split()[2]
        for r in caplog.records
        if "POST /v1/embeddings" in r.getMessage() and record.id in r.getMessage()
    ]
    assert statuses[0] == "429" and statuses[-1] == "200", statuses


def test_every_response_of_a_limited_key_carries_the_rate_limit_headers(keyed: KeyedServer) -> None:
    _, secret = keyed.create("headers", rpm=60, tpm=1000)
    responses = [
        embed(keyed, secret, {"model": MODEL, "input": [ids(40)]}),  # 200
        embed(keyed, secret, {"model": MODEL, "input": ""}),  # 400
        embed(keyed, secret, {"model": "nope", "input": "x"}),  # 404
        get(keyed, "/v1/models", secret),
        get(keyed, "/v1/models/nope", secret),
        get(keyed, "/v1/usage", secret),  # 403
    ]
    assert [r.status_code for r in responses] == [200, 400, 404, 200, 404, 403]
    for response in responses:
        assert set(response.headers) >= RATE_HEADERS, (response.status_code, response.headers)
    first = responses[0].headers
    assert first["x-ratelimit-limit-requests"] == "60" and first["x-ratelimit-limit-tokens"] == "1000"
    assert first["x-ratelimit-remaining-requests"] == "59"
    remaining = int(first["x-ratelimit-remaining-tokens"])
    assert 960 <= remaining < 1000  # 40 taken, refilling at 1000 per minute
    assert re.fullmatch(r"\d+(\.\d+)?s|\d+ms", first["x-ratelimit-reset-tokens"])
    # requests are counted when admitted (the 400 and 404 too); tokens only when embedded
    assert int(responses[2].headers["x-ratelimit-remaining-requests"]) < 59
    assert int(responses[2].headers["x-ratelimit-remaining-tokens"]) >= remaining


def test_unlimited_keys_get_no_rate_limit_headers(keyed: KeyedServer) -> None:
    _, managed = keyed.create("unlimited")
    for key in (managed, STATIC, ADMIN):
        for response in (
            embed(keyed, key, {"model": MODEL, "input": "x"}),
            embed(keyed, key, {"model": MODEL, "input": ""}),
            get(keyed, "/v1/models", key),
        ):
            assert not RATE_HEADERS & set(response.headers)
    assert not RATE_HEADERS & set(embed(keyed, "sk-wrong", {"model": MODEL, "input": "x"}).headers)


# ---- usage ------------------------------------------------------------------------------------------


def usage_of(keyed: KeyedServer, key_id: str, **params: str) -> dict[str, Any]:
    response = get(keyed, "/v1/usage", ADMIN, params={"key": key_id, **params})
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


def test_only_successful_requests_are_billed_with_the_tokens_the_response_reports(keyed: KeyedServer) -> None:
    record, secret = keyed.create("billed", tpm=1000)
    failures = [
        embed(keyed, secret, {"model": MODEL, "input": ""}),  # 400
        embed(keyed, secret, {"model": MODEL, "input": "x " * 500}),  # 400 context length
        embed(keyed, secret, {"model": "nope", "input": "x"}),  # 404
        embed(keyed, secret, {"model": MODEL, "input": [ids(200)] * 6}),  # 429 too large
    ]
    assert [r.status_code for r in failures] == [400, 400, 404, 429]
    ok = [
        embed(keyed, secret, {"model": MODEL, "input": ["hello world", "another input"]}),
        embed(keyed, secret, {"model": SMALL, "input": [ids(12)]}),
    ]
    assert all(r.status_code == 200 for r in ok)
    doc = usage_of(keyed, record.id, group_by="model")
    tokens = [r.json()["usage"]["prompt_tokens"] for r in ok]
    assert doc["total"]["requests"] == 2 and doc["total"]["inputs"] == 3
    assert doc["total"]["prompt_tokens"] == sum(tokens)
    assert [(row["model"], row["prompt_tokens"]) for row in doc["data"]] == [
        (MODEL, tokens[0]),
        (SMALL, tokens[1]),
    ]
    assert doc["data"][0]["cost"] == pytest.approx(tokens[0] * PRICE / 1e6)
    assert doc["data"][1]["cost"] == 0


def test_the_usage_cli_prints_the_json_of_the_http_route_and_a_table(keyed: KeyedServer) -> None:
    record, secret = keyed.create("reported")
    response = embed(keyed, secret, {"model": MODEL, "input": ["one", "two three"]})
    over_http = usage_of(keyed, record.id, group_by="day")  # also writes this replica's pending records

    def cli(*args: str) -> str:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "embedserve",
                "usage",
                "--key",
                record.id,
                "--group-by",
                "day",
                "--data-dir",
                str(keyed.data_dir),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ),
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert json.loads(cli("--json")) == over_http
    table = cli().splitlines()
    assert table[0].split() == ["DAY", "REQUESTS", "INPUTS", "PROMPT_TOKENS", "COST"]
    tokens = response.json()["usage"]["prompt_tokens"]
    assert table[-1].split() == ["TOTAL", "1", "2", str(tokens), f"{tokens * PRICE / 1e6:.6f}"]
