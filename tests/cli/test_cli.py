"""The `embedserve` command as a newcomer runs it: start-up failures are one clear line and exit 2, the
server starts on the bundled model, says whether it is open, prints working curl and SDK snippets, and
exits cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI

from conftest import FamilyModels
from embedserve.settings import Settings
from support import bundled_folder, free_port, live_server, wait_until_ok


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}  # HF_HOME decides
    return subprocess.run(
        [sys.executable, "-m", "embedserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**full_env, **(env or {})},
    )


def test_missing_hub_model_refuses_to_start_with_one_line_naming_model_and_cache(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", "BAAI/bge-m3", "--port", "0", env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "BAAI/bge-m3" in lines[0]
    assert str(tmp_path / "hf") in lines[0]
    assert "Traceback" not in result.stderr


def test_path_that_is_neither_folder_nor_repo_id_refuses_to_start(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", str(tmp_path / "does" / "not" / "exist"))
    assert result.returncode == 2
    assert "not a bundled model, not a folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_weights_with_the_wrong_sha256_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "tampered"
    shutil.copytree(bundled_folder(), folder)
    with (folder / "model.safetensors").open("ab") as fh:
        fh.write(b"\0")
    catalog = tmp_path / "models.toml"
    catalog.write_text(
        f'[[models]]\nid = "tampered"\nsource = "{folder}"\n'
        'sha256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"\n'
    )
    result = run_cli("serve", "--models-file", str(catalog))
    assert result.returncode == 2
    assert "tampered" in result.stderr and "53aa5117" in result.stderr and "sha256" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('pooling = "max"', 'pooling: "max" is not one of cls, mean, last_token, splade'),
        ('poolin = "mean"', "poolin: unknown key (did you mean 'pooling'?)"),
        ("normalize = 1", "normalize: must be true or false, got 1"),
        ('aliases = "mini"', 'aliases: must be a list of non-empty strings, got "mini"'),
    ],
)
def test_bad_models_file_entry_is_one_line_naming_file_entry_and_field(
    tmp_path: Path, entry: str, problem: str
) -> None:
    catalog = tmp_path / "models.toml"
    fine = '[[models]]\nsource = "all-MiniLM-L6-v2"\n'
    catalog.write_text(f'{fine}\n[[models]]\nid = "mini"\nsource = "all-MiniLM-L6-v2"\n{entry}\n')
    result = run_cli("models", "--models-file", str(catalog))
    assert result.returncode == 2
    assert result.stderr == f'embedserve: error: models file {catalog}, model #2 ("mini"): {problem}\n'
    assert result.stdout == ""


def test_models_command_lists_the_bundled_default_as_json() -> None:
    result = run_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["id"] == "all-MiniLM-L6-v2"
    assert row["aliases"] == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert row["dimensions"] == 384 and row["max_input_tokens"] == 256 and row["pooling"] == "mean"


def test_serve_runs_open_on_the_default_model_prints_snippets_and_stops_on_sigterm() -> None:
    port = free_port()
    env = {**os.environ, "EMBEDSERVE_API_KEYS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedserve", "serve", "--port", str(port)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_until_ok(f"http://127.0.0.1:{port}/ready", alive=lambda: proc.poll() is None)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="anything", max_retries=0)
        result = client.embeddings.create(model="all-MiniLM-L6-v2", input="hello world")
        assert len(result.data[0].embedding) == 384
        httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"X-Request-ID": "cli-trace-42"})
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "OPEN" in stderr
    assert f"curl http://127.0.0.1:{port}/v1/embeddings" in stderr
    assert f'OpenAI(base_url="http://127.0.0.1:{port}/v1"' in stderr
    assert re.search(r"\[cli-trace-42\] GET /v1/models 200", stderr)
    assert "Traceback" not in stderr


def test_api_keys_come_from_the_environment_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDSERVE_API_KEYS", "k1, k2,,k3")
    assert Settings().api_keys == ["k1", "k2", "k3"]
    assert Settings(api_keys=["flag"]).api_keys == ["flag"]  # flags win over the environment


def test_truncate_option_cuts_instead_of_rejecting() -> None:
    long_text = "tokens " * 400
    with live_server(Settings(truncate=True)) as live:
        response = httpx.post(
            f"{live.v1}/embeddings", timeout=60, json={"model": "all-MiniLM-L6-v2", "input": long_text}
        )
        ids = httpx.post(
            f"{live.v1}/embeddings",
            timeout=60,
            json={"model": "all-MiniLM-L6-v2", "input": [[101] + [1000] * 300 + [102]]},
        )
        exact = httpx.post(
            f"{live.v1}/embeddings", timeout=60, json={"model": "all-MiniLM-L6-v2", "input": "tokens " * 254}
        )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 256
    assert ids.status_code == 200 and ids.json()["usage"]["prompt_tokens"] == 256
    a = response.json()["data"][0]["embedding"]
    b = exact.json()["data"][0]["embedding"]
    assert sum(x * y for x, y in zip(a, b, strict=True)) >= 0.9999  # cut keeps [CLS] ... [SEP]


def _hf_cache_with(model: Path, home: Path, repo_id: str) -> None:
    """Lay `model` out as the Hugging Face cache does: blobs behind refs/main and a snapshot."""
    org, name = repo_id.split("/")
    repo = home / "hub" / f"models--{org}--{name}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_hub_repo_id_is_found_in_the_cache_under_hf_home(tmp_path: Path, tiny_dense_model: Path) -> None:
    _hf_cache_with(tiny_dense_model, tmp_path / "hf", "acme/tiny-embed")
    result = run_cli("models", "--json", "--model", "acme/tiny-embed", env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["id"] == "acme/tiny-embed"
    assert row["aliases"] == ["tiny-embed"]
    assert row["folder"].startswith(str(tmp_path / "hf" / "hub" / "models--acme--tiny-embed"))
    assert row["dimensions"] == 16 and row["pooling"] == "cls"


def test_allow_download_while_offline_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = run_cli(
        "serve",
        "--model",
        "acme/not-cached",
        "--allow-download",
        env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "acme/not-cached" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_bge_m3_and_qwen3_from_the_hf_cache_by_repo_id(family_models: FamilyModels) -> None:
    """The issue's acceptance: `--model BAAI/bge-m3` and `--model Qwen/Qwen3-Embedding-0.6B` with the
    weights in the HF cache (the session's own HF_HOME, where the fixture installed tiny checkpoints)."""
    from tiny_models import bge_m3_reference, qwen3_query, qwen3_reference

    port = free_port()
    env = {**os.environ, "EMBEDSERVE_API_KEYS": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedserve",
            "serve",
            "--model",
            "BAAI/bge-m3",
            "--model",
            "Qwen/Qwen3-Embedding-0.6B",
            "--port",
            str(port),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    texts = ["hello world", "a longer sentence about the quick brown fox and the lazy dog"]
    try:
        wait_until_ok(f"http://127.0.0.1:{port}/ready", alive=lambda: proc.poll() is None)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="anything", max_retries=0)
        bge = client.embeddings.create(model="bge-m3", input=texts)
        query = client.embeddings.create(
            model="Qwen/Qwen3-Embedding-0.6B",
            input=texts,
            dimensions=256,
            extra_body={"input_type": "query", "instruction": "Find it"},
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    served_bge = np.array([d.embedding for d in bge.data])
    reference_bge = bge_m3_reference(family_models.bge_m3, texts)
    assert (served_bge * reference_bge).sum(axis=1).min() >= 0.9999
    served_q = np.array([d.embedding for d in query.data])
    reference_q = qwen3_reference(family_models.qwen3, [qwen3_query("Find it", t) for t in texts])[:, :256]
    reference_q /= np.linalg.norm(reference_q, axis=1, keepdims=True)
    assert served_q.shape == (2, 256) and (served_q * reference_q).sum(axis=1).min() >= 0.9999
    assert "model 'BAAI/bge-m3': bge-m3 preset" in stderr
    assert "model 'Qwen/Qwen3-Embedding-0.6B': qwen3-embedding preset" in stderr
