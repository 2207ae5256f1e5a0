"""Shared fixtures. Tests never download: the hub is switched off before anything imports it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from embedserve.settings import Settings
from support import LiveServer, build_tiny_st_model, live_server

API_KEY = "sk-test-primary"
OTHER_KEY = "sk-test-secondary"
MAX_TOKENS_PER_REQUEST = 20_000
MRL_DIMS = (64, 128, 256, 384)


@pytest.fixture(scope="session")
def tiny_dense_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLS pooling + Dense(32 -> 16) + Normalize, saved by sentence-transformers."""
    return build_tiny_st_model(tmp_path_factory.mktemp("tiny") / "tiny-cls-dense", pooling="cls",
                               dense_out=16, normalize=True)


@pytest.fixture(scope="session")
def models_file(tmp_path_factory: pytest.TempPathFactory, tiny_dense_model: Path) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "models.toml"
    path.write_text(f"""
[[models]]
source = "all-MiniLM-L6-v2"

[[models]]
id = "minilm-mrl"
source = "sentence-transformers/all-MiniLM-L6-v2"
matryoshka_dimensions = {list(MRL_DIMS)}

[[models]]
id = "minilm-prompted"
source = "all-MiniLM-L6-v2"
prompts = {{ passage = "passage: ", query = "query: " }}
default_prompt_name = "passage"

[[models]]
id = "tiny-cls-dense"
source = "{tiny_dense_model}"
""")
    return path


@pytest.fixture(scope="session")
def server(models_file: Path) -> Iterator[LiveServer]:
    """The main live server: real models, API keys on, default request limits except the token total
    (lowered so that a request over it stays small)."""
    settings = Settings(models_file=models_file, api_keys=[API_KEY, OTHER_KEY],
                        max_tokens_per_request=MAX_TOKENS_PER_REQUEST)
    with live_server(settings) as live:
        yield live


@pytest.fixture(scope="session")
def client(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def st_model():  # type: ignore[no-untyped-def]
    """The reference: sentence-transformers itself on the bundled folder."""
    from sentence_transformers import SentenceTransformer

    from support import bundled_folder

    return SentenceTransformer(str(bundled_folder()), device="cpu")
