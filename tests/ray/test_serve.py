"""The server as a Ray Serve application (deploy/ray_serve.py): two replicas of the bundled model on a
local Ray, behind Ray Serve's proxy, sharing the session's PostgreSQL (keys, usage) and a real Redis (rate
limits). Vectors equal the in-process engine's, the ledger equals the responses' usage, a revocation
reaches every replica within a second, and a killed replica is replaced. One application per module."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from embedserve.settings import Settings
from embedserve.sync import EngineSync
from postgres import PostgresCluster
from rayenv import local_ray
from redis_server import redis_server
from support import free_port, private_data_dir, wait_until_ok

pytestmark = [
    pytest.mark.model,  # (outside the directories conftest marks by: the replicas serve the model)
    # Ray Serve's own pydantic models, as `ray.serve` is imported: Ray's to fix, not ours.
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning"),
]

MODEL = "all-MiniLM-L6-v2"
ADMIN = "sk-ray-admin"
REPLICA = "x-embedserve-replica"
TEXTS = [
    "hi",
    "The quick brown fox jumps over the lazy dog.",
    "Zürich 🚀 " * 20,
    "a somewhat longer sentence about bridges and the engineers who build them " * 3,
]


@dataclass
class RayApp:
    base: str
    settings: Settings
    reference: dict[str, np.ndarray]  # the in-process engine's vector of each text

    @property
    def v1(self) -> str:
        return f"{self.base}/v1"

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, f"{self.v1}{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60, **kwargs
        )

    def create_key(self, name: str, **limits: Any) -> tuple[str, str]:
        """-> (key id, secret), created over the admin route, once both replicas take it (the one that
        wrote it at once, the other at its next refresh of the key table)."""
        response = self.admin("POST", "/keys", json={"name": name, **limits})
        assert response.status_code == 201, response.text
        secret = response.json()["key"]
        taken: set[str] = set()
        seen: Counter[tuple[str | None, int]] = Counter()

        def both_take_it() -> bool:
            answer = httpx.get(f"{self.v1}/models", headers={"Authorization": f"Bearer {secret}"}, timeout=60)
            seen[answer.headers.get(REPLICA), answer.status_code] += 1
            if answer.status_code == 200:
                taken.add(answer.headers[REPLICA])
            return len(taken) == 2

        # A replica takes it at its next refresh (every 0.5 s); a loaded CI machine has been seen to
        # take longer than 10 s, so the bound is generous and the failure says what each replica answered.
        deadline = time.monotonic() + 30
        while not both_take_it():
            assert time.monotonic() < deadline, f"both replicas to take the new key: {dict(seen)}"
            time.sleep(0.1)
        return response.json()["id"], secret

    def embed(self, secret: str, text: str = "hello replicas") -> httpx.Response:
        return httpx.post(
            f"{self.v1}/embeddings",
            json={"model": MODEL, "input": text},
            headers={"Authorization": f"Bearer {secret}"},
            timeout=60,
        )


def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_app(postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayApp]:
    from ray import serve

    from embedserve.deploy.ray_serve import APP_NAME, application, replica_settings

    data_dir = private_data_dir(tmp_path_factory.mktemp("ray-serve") / "data")
    # First, in this process: the reference vectors (and the ONNX export the replicas then find cached).
    with EngineSync.open(MODEL, data_dir=data_dir) as engine:
        reference = dict(zip(TEXTS, engine.embed(MODEL, TEXTS).vectors, strict=True))
    with redis_server() as redis, local_ray(num_cpus=2):
        port = free_port()
        settings = Settings(
            models=[MODEL],
            data_dir=data_dir,
            database_url=postgres.fresh_database(),
            admin_keys=[ADMIN],
            rate_limit_store=redis.url(),
            usage_flush_interval=0.25,
            ray=True,
            replicas=2,
            cpu_cores=1,
            host="127.0.0.1",
            port=port,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            resolved, _ = replica_settings(settings)
            serve.run(application(resolved), name=APP_NAME, route_prefix="/")  # returns once both are healthy
            base = f"http://127.0.0.1:{port}"
            wait_until_ok(f"{base}/ready", alive=lambda: True, timeout_s=60)
            yield RayApp(base=base, settings=settings, reference=reference)
        finally:
            serve.shutdown()


def replicas_serving(call: Callable[[], httpx.Response], at_least: int = 2, tries: int = 60) -> Counter[str]:
    """Calls `call` until `at_least` distinct replicas have answered (Ray's proxy picks one per request)
    -> the replicas and how many answers each gave."""
    seen: Counter[str] = Counter()
    for _ in range(tries):
        seen[call().headers[REPLICA]] += 1
        if len(seen) >= at_least:
            break
    return seen


def test_the_official_client_gets_the_in_process_engines_vectors_from_both_replicas(ray_app: RayApp) -> None:
    _, secret = ray_app.create_key("vectors")
    client = OpenAI(base_url=ray_app.v1, api_key=secret, max_retries=0)
    served: Counter[str] = Counter()
    for _ in range(40):
        raw = client.embeddings.with_raw_response.create(model=MODEL, input=TEXTS)
        served[raw.headers[REPLICA]] += 1
        result = raw.parse()
        assert [item.index for item in result.data] == list(range(len(TEXTS)))
        for text, item in zip(TEXTS, result.data, strict=True):
            got = np.asarray(item.embedding, dtype=np.float32)
            want = ray_app.reference[text]
            assert float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))) >= 0.9999
            np.testing.assert_allclose(got, want, atol=1e-5)
        if len(served) == 2 and min(served.values()) >= 2:
            break
    assert len(served) == 2, f"one replica answered every request: {served}"


def test_the_ledger_equals_the_responses_usage_exactly_across_both_replicas(ray_app: RayApp) -> None:
    key_id, secret = ray_app.create_key("ledger")
    bodies = [{"model": MODEL, "input": TEXTS[i % 4 :] if i % 3 else TEXTS[i % 4]} for i in range(48)]

    def send(body: dict[str, Any]) -> tuple[int, str]:
        response = httpx.post(
            f"{ray_app.v1}/embeddings", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=120
        )
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"], response.headers[REPLICA]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, bodies))
    assert len({replica for _, replica in answers}) == 2
    expected = {"requests": len(bodies), "prompt_tokens": sum(tokens for tokens, _ in answers)}

    def totals() -> dict[str, int]:
        rows = ray_app.admin("GET", "/usage", params={"group_by": "key"}).json()["data"]
        row = next((r for r in rows if r["key_id"] == key_id), {"requests": 0, "prompt_tokens": 0})
        return {"requests": row["requests"], "prompt_tokens": row["prompt_tokens"]}

    until(lambda: totals() == expected, 10, f"the ledger to show {expected}")  # (each replica flushes)
    time.sleep(1.0)  # a few flushes later: nothing is written twice
    assert totals() == expected


def test_a_key_with_rpm_30_gets_30_requests_across_both_replicas_not_60(ray_app: RayApp) -> None:
    _, secret = ray_app.create_key("rpm-30", rpm=30)
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: ray_app.embed(secret), range(60)))
    # The bucket refills one request every 2 s: on a loaded machine a long burst earns a few more.
    refilled = int((time.monotonic() - started) / 2)
    statuses = Counter(response.status_code for response in answers)
    assert len({response.headers[REPLICA] for response in answers}) == 2
    assert set(statuses) == {200, 429} and statuses[200] + statuses[429] == 60, statuses
    assert 30 <= statuses[200] <= 30 + refilled, (statuses, refilled)
    refused = next(response for response in answers if response.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" in refused.headers


def test_a_revoked_key_is_refused_by_every_replica_within_a_second(ray_app: RayApp) -> None:
    key_id, secret = ray_app.create_key("to-revoke")
    assert len(replicas_serving(lambda: ray_app.embed(secret))) == 2  # each replica has seen it work
    revoked = ray_app.admin("DELETE", f"/keys/{key_id}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    time.sleep(1.0)
    answers = [ray_app.embed(secret) for _ in range(24)]
    assert len({response.headers[REPLICA] for response in answers}) == 2
    for response in answers:
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and "revoked" in error["message"]
    assert ray_app.admin("GET", "/keys").status_code == 200  # and the replicas still serve


def test_a_killed_replica_is_replaced_and_later_requests_succeed(ray_app: RayApp) -> None:
    import ray

    _, secret = ray_app.create_key("survivor")
    victim = ray_app.embed(secret).headers[REPLICA]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    def replaced() -> bool:
        try:
            answers = replicas_serving(lambda: ray_app.embed(secret), tries=20)
        except (httpx.HTTPError, KeyError):  # (a request routed to the dead replica has no replica header)
            return False
        return len(answers) == 2 and victim not in answers

    until(replaced, 120, "a new replica serving beside the survivor")
    answers = [ray_app.embed(secret, text) for text in TEXTS * 4]
    assert [response.status_code for response in answers] == [200] * len(answers)
    assert victim not in {response.headers[REPLICA] for response in answers}
