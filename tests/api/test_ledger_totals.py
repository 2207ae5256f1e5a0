"""The issue's acceptance test: a known set of requests from several keys, sent concurrently to a live
server with the official client and plain HTTP, leaves a ledger whose totals equal the sum of the
responses' `usage.prompt_tokens` exactly, per key and in all, on SQLite and on PostgreSQL; failed
requests leave nothing, and a clean shutdown writes every pending record exactly once."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI

from conftest import Storage
from embedserve.keys import KeyChanges, KeyStore, load_pepper, static_principal
from embedserve.usage import UsageQuery, report
from support import live_server

MODEL = "all-MiniLM-L6-v2"
ADMIN = "sk-acceptance-admin"
STATIC = "sk-acceptance-static"
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "embedding",
    "ledger",
    "billing",
    "token",
]


def bodies(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Varied requests: one text, several texts, token ids, base64, different lengths."""
    out: list[dict[str, Any]] = []
    for i in range(count):
        texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(rng.randint(1, 4))]
        if i % 4 == 0:
            out.append({"model": MODEL, "input": texts[0]})
        elif i % 4 == 1:
            out.append({"model": MODEL, "input": texts, "encoding_format": "base64"})
        elif i % 4 == 2:
            arrays = [
                [101, *rng.choices(range(1000, 5000), k=rng.randint(1, 100)), 102]
                for _ in range(rng.randint(1, 3))
            ]
            out.append({"model": MODEL, "input": arrays})
        else:
            out.append({"model": "sentence-transformers/all-MiniLM-L6-v2", "input": texts})  # an alias
    return out


def test_ledger_totals_equal_the_responses_usage_exactly_under_concurrent_load(storage: Storage) -> None:
    db = storage.open()
    try:
        store = KeyStore(db)
        pepper = load_pepper(None, storage.data_dir)
        managed = [
            store.create(pepper, KeyChanges(name=f"team-{i}", **limits))
            for i, limits in enumerate([{}, {"rpm": 10_000, "tpm": 10_000_000}, {"models": [MODEL]}])
        ]
        secrets = {record.id: secret for record, secret in managed}
        secrets[static_principal(pepper, STATIC, admin=False)[1].key_id] = STATIC
        rng = random.Random(5)
        plan = {key_id: bodies(rng, 12) for key_id in secrets}

        settings = storage.settings(api_keys=[STATIC], admin_keys=[ADMIN], usage_flush_interval=0.25)
        with live_server(settings) as live:

            async def send_all() -> tuple[dict[str, list[int]], dict[str, set[str]]]:
                tokens: dict[str, list[int]] = defaultdict(list)
                request_ids: dict[str, set[str]] = defaultdict(set)
                async with httpx.AsyncClient(timeout=300) as http:

                    async def over_http(key_id: str, body: dict[str, Any], n: int) -> None:
                        request_id = f"{key_id}-{n}"
                        response = await http.post(
                            f"{live.v1}/embeddings",
                            json=body,
                            headers={
                                "Authorization": f"Bearer {secrets[key_id]}",
                                "X-Request-ID": request_id,
                            },
                        )
                        assert response.status_code == 200, response.text
                        tokens[key_id].append(response.json()["usage"]["prompt_tokens"])
                        request_ids[key_id].add(request_id)

                    async def with_sdk(key_id: str, body: dict[str, Any], n: int) -> None:
                        client = AsyncOpenAI(base_url=live.v1, api_key=secrets[key_id], max_retries=0)
                        request_id = f"{key_id}-sdk-{n}"
                        result = await client.embeddings.create(
                            extra_headers={"X-Request-ID": request_id}, **body
                        )
                        tokens[key_id].append(result.usage.prompt_tokens)
                        request_ids[key_id].add(request_id)

                    async def failing(key_id: str) -> None:  # never billed
                        for body in (
                            {"model": MODEL, "input": ""},
                            {"model": "nope", "input": "x"},
                            {"model": MODEL, "input": [[101, 10**9, 102]]},
                        ):
                            response = await http.post(
                                f"{live.v1}/embeddings",
                                json=body,
                                headers={"Authorization": f"Bearer {secrets[key_id]}"},
                            )
                            assert response.status_code in (400, 404)

                    jobs = [
                        (with_sdk if n % 2 else over_http)(key_id, body, n)
                        for key_id, key_bodies in plan.items()
                        for n, body in enumerate(key_bodies)
                    ]
                    jobs += [failing(key_id) for key_id in plan]
                    rng.shuffle(jobs)
                    await asyncio.gather(*jobs)
                return tokens, request_ids

            sent, request_ids = asyncio.run(send_all())
            over_http = httpx.get(
                f"{live.v1}/usage", params={"group_by": "key"}, headers={"Authorization": f"Bearer {ADMIN}"}
            ).json()

        expected = {key_id: {"requests": len(t), "prompt_tokens": sum(t)} for key_id, t in sent.items()}
        assert all(len(t) == 12 for t in sent.values())
        got = {
            row["key_id"]: {"requests": row["requests"], "prompt_tokens": row["prompt_tokens"]}
            for row in over_http["data"]
        }
        assert got == expected
        assert over_http["total"]["prompt_tokens"] == sum(sum(t) for t in sent.values())
        # after the shutdown flush: the same totals, each record written exactly once
        after = report(db, UsageQuery(group_by="key"))
        assert {
            row["key_id"]: {"requests": row["requests"], "prompt_tokens": row["prompt_tokens"]}
            for row in after["data"]
        } == expected
        assert after["total"] == over_http["total"]
        with db.transaction(write=False) as tx:
            rows = tx.fetchall("SELECT key_id, request_id, model FROM usage_records")
        assert Counter(request_id for _, request_id, _ in rows).most_common(1)[0][1] == 1
        assert {(key_id, request_id) for key_id, request_id, _ in rows} == {
            (key_id, request_id) for key_id, ids in request_ids.items() for request_id in ids
        }
        assert {model for _, _, model in rows} == {MODEL}  # aliases are billed under the model's id
    finally:
        db.close()


def test_keys_given_on_the_command_line_keep_working_as_unlimited_keys(storage: Storage) -> None:
    settings = storage.settings(api_keys=[STATIC])
    with live_server(settings) as live:
        client = openai.OpenAI(base_url=live.v1, api_key=STATIC, max_retries=0)
        raw = client.embeddings.with_raw_response.create(model=MODEL, input=["a"] * 100)
        assert raw.http_response.status_code == 200
        assert not any(name.startswith("x-ratelimit") for name in raw.headers)
