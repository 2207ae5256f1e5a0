"""The `output_dtype` extension through a live server: every compact type, as JSON integers and as base64
bytes, equals sentence-transformers' `quantize_embeddings` of the same server's float32 vectors under the
ranges the model's card publishes; `dimensions` quantizes with that width's ranges; the ranges survive a
restart, are what the data dir holds, and come back the same when computed again; a bad `output_dtype` is
a 400."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from openai import OpenAI

from conftest import API_KEY, MRL_DIMS
from embedserve.compact import calibration_ranges
from embedserve.postprocess import finish
from embedserve.settings import Settings
from support import MIXED_TEXTS, LiveServer, live_server, private_data_dir

MODEL = "all-MiniLM-L6-v2"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXTS = [
    *MIXED_TEXTS,
    "How do I reverse a list in Python?",
    "Die Brücke über den Fluss wurde 1890 gebaut.",
    "SELECT name FROM users WHERE id = 42;",
    "x",
]
DTYPES = ("int8", "uint8", "binary", "ubinary")
NUMPY_DTYPE = {"int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}


def quantize_embeddings(vectors: npt.NDArray[np.float32], dtype: str, ranges: Any) -> Any:
    """The reference, imported here: sentence-transformers is a test dependency, not the server's."""
    from sentence_transformers.util.quantization import quantize_embeddings as reference

    return reference(vectors, precision=dtype, ranges=ranges)  # type: ignore[arg-type]


def post(base: str, body: dict[str, Any], headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(f"{base}/v1/embeddings", json=body, headers=headers, timeout=120)


def card(base: str, model: str, headers: dict[str, str] = AUTH) -> dict[str, Any]:
    response = httpx.get(f"{base}/v1/models/{model}", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def published_ranges(base: str, model: str, width: int, headers: dict[str, str] = AUTH) -> npt.NDArray[Any]:
    """[2, width] float32, as a client reads the card."""
    widths = card(base, model, headers)["quantization"]["ranges"]
    return np.asarray([widths[str(width)]["min"], widths[str(width)]["max"]], dtype=np.float32)


def float_vectors(client: OpenAI, model: str, dimensions: int | None = None) -> npt.NDArray[np.float32]:
    extra: dict[str, Any] = {} if dimensions is None else {"dimensions": dimensions}
    result = client.embeddings.create(model=model, input=TEXTS, encoding_format="float", **extra)
    return np.asarray([item.embedding for item in result.data], dtype=np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_json_integers_equal_quantize_embeddings_of_the_float_vectors(
    server: LiveServer, client: OpenAI, dtype: str
) -> None:
    expected = quantize_embeddings(
        float_vectors(client, MODEL), dtype, published_ranges(server.base_url, MODEL, 384)
    )
    width = 384 if dtype.endswith("int8") else 384 // 8
    assert expected.shape == (len(TEXTS), width)
    raw = post(server.base_url, {"model": MODEL, "input": TEXTS, "output_dtype": dtype})
    assert raw.status_code == 200, raw.text
    rows = [item["embedding"] for item in raw.json()["data"]]
    assert all(type(value) is int for row in rows for value in row)  # JSON integers, not 1.0
    assert np.array_equal(np.asarray(rows, dtype=np.int64), expected.astype(np.int64))
    # The official client passes the extension through and reads the integers as numbers.
    result = client.embeddings.create(
        model=MODEL, input=TEXTS, encoding_format="float", extra_body={"output_dtype": dtype}
    )
    assert np.array_equal(np.asarray([item.embedding for item in result.data]), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_base64_is_the_raw_bytes_of_quantize_embeddings(
    server: LiveServer, client: OpenAI, dtype: str
) -> None:
    expected = quantize_embeddings(
        float_vectors(client, MODEL), dtype, published_ranges(server.base_url, MODEL, 384)
    )
    response = post(
        server.base_url, {"model": MODEL, "input": TEXTS, "encoding_format": "base64", "output_dtype": dtype}
    )
    assert response.status_code == 200, response.text
    rows = [base64.b64decode(item["embedding"]) for item in response.json()["data"]]
    assert rows == [vector.tobytes() for vector in expected]
    assert np.array_equal(np.stack([np.frombuffer(row, dtype=NUMPY_DTYPE[dtype]) for row in rows]), expected)


@pytest.mark.parametrize("dimensions", [MRL_DIMS[0], MRL_DIMS[2]])
@pytest.mark.parametrize("dtype", ["int8", "ubinary"])
def test_dimensions_truncates_and_normalizes_before_quantizing_with_that_widths_ranges(
    server: LiveServer, client: OpenAI, dtype: str, dimensions: int
) -> None:
    floats = float_vectors(client, "minilm-mrl", dimensions)
    ranges = published_ranges(server.base_url, "minilm-mrl", dimensions)
    result = client.embeddings.create(
        model="minilm-mrl",
        input=TEXTS,
        encoding_format="float",
        dimensions=dimensions,
        extra_body={"output_dtype": dtype},
    )
    got = np.asarray([item.embedding for item in result.data], dtype=np.int64)
    assert np.array_equal(got, quantize_embeddings(floats, dtype, ranges).astype(np.int64))
    # The width's own ranges: those of the native width's first dimensions would place it otherwise.
    native = published_ranges(server.base_url, "minilm-mrl", 384)[:, :dimensions]
    assert not np.array_equal(ranges, native)


def test_cards_publish_the_calibration_digest_and_retrieve_its_ranges_by_width(server: LiveServer) -> None:
    listed = httpx.get(f"{server.v1}/models", headers=AUTH, timeout=30).json()["data"]
    cards = {item["id"]: item for item in listed}
    mrl = card(server.base_url, "minilm-mrl")
    assert cards["minilm-mrl"]["quantization"] == {
        "calibration": mrl["quantization"]["calibration"],
        "ranges": None,
    }
    assert sorted(int(width) for width in mrl["quantization"]["ranges"]) == sorted({*MRL_DIMS, 384})
    for width, ranges in mrl["quantization"]["ranges"].items():
        low, high = np.asarray(ranges["min"]), np.asarray(ranges["max"])
        assert low.shape == high.shape == (int(width),)
        assert np.all(low < high) and np.all(low >= -1) and np.all(high <= 1)  # normalized vectors
    # Same weights, same prompt: the two ids share one calibration, so their vectors compare.
    plain = card(server.base_url, MODEL)["quantization"]
    assert plain["calibration"] == mrl["quantization"]["calibration"]
    assert plain["ranges"]["384"] == mrl["quantization"]["ranges"]["384"]


@pytest.mark.parametrize("value", ["int4", "INT8", "", 8, ["int8"]])
def test_a_bad_output_dtype_is_400_invalid_output_dtype(server: LiveServer, value: Any) -> None:
    response = post(server.base_url, {"model": MODEL, "input": "hello", "output_dtype": value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_output_dtype"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "output_dtype"
    assert "int8" in error["message"] and "ubinary" in error["message"]
    assert (
        post(server.base_url, {"model": MODEL, "input": "hello", "output_dtype": "int8"}).status_code == 200
    )


@pytest.fixture(scope="module")
def restart_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compact") / "models.toml"
    path.write_text(f"""
[[models]]
source = "all-MiniLM-L6-v2"

[[models]]
id = "minilm-mrl"
source = "sentence-transformers/all-MiniLM-L6-v2"
matryoshka_dimensions = {list(MRL_DIMS)}
""")
    return path


@pytest.fixture
def served(restart_models: Path, tmp_path: Path) -> Settings:
    """Settings of an open server with a data dir of its own (the session's ONNX graphs, not its
    calibration)."""
    data_dir = private_data_dir(tmp_path / "data", shared=("onnx",))
    return Settings(models_file=restart_models, data_dir=data_dir)


def test_ranges_are_read_back_after_a_restart_and_recomputed_alike_without_the_file(served: Settings) -> None:
    folder = served.data_dir / "calibration"
    with live_server(served) as first:
        before = {model: card(first.base_url, model, {})["quantization"] for model in (MODEL, "minilm-mrl")}
        vector = post(first.base_url, {"model": MODEL, "input": TEXTS, "output_dtype": "int8"}, {}).json()
    (stored,) = folder.glob("*.npy")  # one file: both ids embed the same weights with the same prompt
    written = stored.stat().st_mtime_ns, stored.stat().st_ino
    with live_server(served) as second:
        assert {
            model: card(second.base_url, model, {})["quantization"] for model in (MODEL, "minilm-mrl")
        } == before
        again = post(second.base_url, {"model": MODEL, "input": TEXTS, "output_dtype": "int8"}, {}).json()
        assert again["data"] == vector["data"]
    assert (stored.stat().st_mtime_ns, stored.stat().st_ino) == written  # read, not computed again
    # What a start publishes is the file's: other vectors there, other ranges on the card.
    pooled = np.load(stored)
    np.save(stored, pooled[: len(pooled) // 2])
    with live_server(served) as third:
        halved = published_ranges(third.base_url, MODEL, 384, {})
    assert np.array_equal(
        halved, calibration_ranges(finish(pooled[: len(pooled) // 2], dimensions=None, normalize=True))
    )
    stored.unlink()
    with live_server(served) as fourth:
        assert card(fourth.base_url, MODEL, {})["quantization"] == before[MODEL]  # the same backend's bytes
    assert np.array_equal(np.load(stored), pooled)
