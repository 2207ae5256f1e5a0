"""Shared fixtures. Tests never download: the hub is switched off before anything imports it."""

from __future__ import annotations

from hermetic import HF_HOME  # first: switches the hub off before anything imports it

# isort: split
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from embedserve.db import PostgresDatabase, SqliteDatabase, open_database
from embedserve.settings import Settings
from gates import Gate
from postgres import PostgresCluster, postgres_cluster
from support import LiveServer, build_tiny_st_model, live_server, private_data_dir

#: Which tests are `model`, `load` and `postgres` (pyproject.toml registers the markers): by directory, then
#: by the fixtures a test requests, so that a new test cannot forget its mark (only a test outside these
#: directories that starts a live server itself marks it by hand). The api/ and cli/ suites serve the
#: bundled model (live servers, `embedserve serve` as a subprocess); ray/ embeds with it on Ray.
MODEL_DIRS = frozenset({"model", "api", "cli", "ray"})
#: The fixtures that build or serve a model (a test's fixture names include those its fixtures request).
MODEL_FIXTURES = frozenset({"server", "st_model", "tiny_dense_model", "family_models"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        suite = item.path.relative_to(tests).parts[0] if item.path.is_relative_to(tests) else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if suite in MODEL_DIRS or fixtures & MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)
        if suite == "load":
            item.add_marker(pytest.mark.load)
        if "postgres" in fixtures or params.get("storage") == "postgresql":
            item.add_marker(pytest.mark.postgres)


API_KEY = "sk-test-primary"
OTHER_KEY = "sk-test-secondary"
MAX_TOKENS_PER_REQUEST = 20_000
MRL_DIMS = (64, 128, 256, 384)


@pytest.fixture(scope="session")
def tiny_dense_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLS pooling + Dense(32 -> 16) + Normalize, saved by sentence-transformers."""
    return build_tiny_st_model(
        tmp_path_factory.mktemp("tiny") / "tiny-cls-dense", pooling="cls", dense_out=16, normalize=True
    )


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
    settings = Settings(
        models_file=models_file, api_keys=[API_KEY, OTHER_KEY], max_tokens_per_request=MAX_TOKENS_PER_REQUEST
    )
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


@dataclass(frozen=True)
class FamilyModels:
    """Tiny bge-m3 and Qwen3-Embedding checkpoints: the first two in the session's HF cache under the
    real repo ids (full repo layout), the others as bare transformers folders (no sentence-transformers
    files), the Qwen3 one with a tokenizer that does not append <|endoftext|> (the original release)."""

    bge_m3: Path  # snapshot folder of BAAI/bge-m3
    qwen3: Path  # snapshot folder of Qwen/Qwen3-Embedding-0.6B
    bge_m3_bare: Path
    qwen3_no_eos: Path


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> FamilyModels:
    from tiny_models import build_tiny_bge_m3, build_tiny_qwen3_embedding, install_in_hub_cache

    root = tmp_path_factory.mktemp("families")
    bge = install_in_hub_cache(build_tiny_bge_m3(root / "hub" / "bge-m3"), Path(HF_HOME), "BAAI/bge-m3")
    qwen = install_in_hub_cache(
        build_tiny_qwen3_embedding(root / "hub" / "Qwen3-Embedding-0.6B"),
        Path(HF_HOME),
        "Qwen/Qwen3-Embedding-0.6B",
    )
    bare = build_tiny_bge_m3(root / "bare" / "bge-m3", sentence_transformers_files=False, seed=1)
    no_eos = build_tiny_qwen3_embedding(
        root / "no-eos" / "Qwen3-Embedding-0.6B",
        eos_in_tokenizer=False,
        sentence_transformers_files=False,
        seed=1,
    )
    return FamilyModels(bge_m3=bge, qwen3=qwen, bge_m3_bare=bare, qwen3_no_eos=no_eos)


@pytest.fixture(scope="session")
def family_server(
    tmp_path_factory: pytest.TempPathFactory,
    family_models: FamilyModels,
) -> Iterator[LiveServer]:
    """bge-m3 and Qwen3-Embedding served by hub id from the cache, plus the bare variants by folder."""
    path = tmp_path_factory.mktemp("family-catalog") / "models.toml"
    path.write_text(f"""
[[models]]
source = "BAAI/bge-m3"

[[models]]
source = "Qwen/Qwen3-Embedding-0.6B"

[[models]]
id = "bge-m3-bare"
source = "{family_models.bge_m3_bare}"

[[models]]
id = "qwen3-no-eos"
source = "{family_models.qwen3_no_eos}"

[[models]]
id = "minilm-prompted"
source = "all-MiniLM-L6-v2"
prompts = {{ query = "query: ", passage = "passage: ", clustering = "cluster: " }}
""")
    with live_server(Settings(models_file=path, api_keys=[API_KEY])) as live:
        yield live


@pytest.fixture(scope="session")
def family_client(family_server: LiveServer) -> OpenAI:
    return OpenAI(base_url=family_server.v1, api_key=API_KEY, max_retries=0)


# ---- databases: the same tests on SQLite and on a real PostgreSQL -----------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster on a free loopback port, for the whole session."""
    with postgres_cluster() as cluster:
        yield cluster


@dataclass(frozen=True)
class Storage:
    """Where a test's key store and ledger live: a private data dir (SQLite), or a fresh PostgreSQL
    database (the data dir then holds only the pepper)."""

    kind: str
    data_dir: Path
    url: str | None

    def settings(self, **overrides: object) -> Settings:
        return Settings(data_dir=self.data_dir, database_url=self.url, **overrides)  # type: ignore[arg-type]

    def open(self) -> SqliteDatabase | PostgresDatabase:
        return open_database(self.url, self.data_dir)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    data_dir = private_data_dir(tmp_path / "data")
    if request.param == "postgresql":
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        return Storage("postgresql", data_dir, cluster.fresh_database())
    return Storage("sqlite", data_dir, None)


# ---- live servers whose forward passes a test holds ----------------------------------------------


@pytest.fixture
def gate() -> Gate:
    """A fresh gate: serve with `live_server(..., backends=gate.backends())`."""
    return Gate()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as executor:
        yield executor
