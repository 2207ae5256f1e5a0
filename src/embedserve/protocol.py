"""Wire shapes of the OpenAI embeddings and files APIs, for the OpenAPI document, and the fast renderers
that write them (orjson straight from float32 buffers; pydantic is never on the hot path)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, Field, RootModel

from embedserve.calibration import Calibration
from embedserve.compact import Ranges
from embedserve.postprocess import encode_colbert, encode_vectors
from embedserve.spec import ModelSpec
from embedserve.types import OUTPUT_DTYPES, EmbeddingResult, ModelStatus


class EmbeddingRequest(BaseModel):
    model: str = Field(description="A served model id or alias.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, texts, token ids, or arrays of token ids. Must not be empty."
    )
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1, description="Matryoshka models only.")
    user: str | None = None
    input_type: str | None = Field(
        None,
        description="Extension: 'query', 'document' (the default) or another prompt name of the "
        "model; picks the prompt or instruction put in front of each text.",
    )
    instruction: str | None = Field(
        None,
        description="Extension: the task of a query (with input_type 'query'), for models with "
        "a query template such as Qwen3-Embedding.",
    )
    outputs: list[Literal["dense", "sparse", "colbert"]] | None = Field(
        None,
        description="Extension: what to compute for each input (default ['dense']): 'sparse' adds "
        "sparse_embedding, 'colbert' adds colbert_embedding; the model's card lists its outputs.",
    )
    output_dtype: Literal["float32", "int8", "uint8", "binary", "ubinary"] | None = Field(
        None,
        description="Extension: the dense vector as float32 (default), int8/uint8 (per-dimension "
        "calibration ranges fixed per model) or binary/ubinary (sign bits packed, MSB first).",
    )


class SparseEmbedding(BaseModel):
    indices: list[int] = Field(description="Token ids, ascending and unique.")
    values: list[float]


class PackedMatrix(BaseModel):
    data: str = Field(description="base64 of the little-endian float32 values, row after row.")
    shape: list[int]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str
    sparse_embedding: SparseEmbedding | None = Field(None, description="With 'sparse' in outputs.")
    colbert_embedding: list[list[float]] | PackedMatrix | None = Field(
        None, description="With 'colbert' in outputs: one L2-normalized vector per token but the first."
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class WidthRanges(BaseModel):
    min: list[float] = Field(description="Each dimension's lowest calibration value (float32).")
    max: list[float] = Field(description="Each dimension's highest calibration value (float32).")


class Quantization(BaseModel):
    calibration: str = Field(
        description="Digest of the model's calibration vectors: servers that show the same one place "
        "the same float vector at the same int8/uint8 levels."
    )
    ranges: dict[str, WidthRanges] | None = Field(
        None,
        description="By width (a 'dimensions' value, or the native one): what int8/uint8 vectors are "
        "placed by, step (max - min) / 255. Only on /v1/models/{model}.",
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    supports: list[str]
    dimensions: int
    matryoshka_dimensions: list[int]
    max_input_tokens: int
    aliases: list[str]
    family: str | None
    input_types: list[str]
    default_instruction: str | None
    status: ModelStatus
    backend: str | None = None
    outputs: list[str] = Field(
        default_factory=lambda: ["dense"],
        description="Extension: what the model computes for an input, to ask for in 'outputs'.",
    )
    output_dtypes: list[str] = Field(
        default_factory=lambda: [str(dtype) for dtype in OUTPUT_DTYPES],
        description="Extension: the types the dense vector can be returned as ('output_dtype').",
    )
    quantization: Quantization | None = Field(
        None, description="Extension: the int8/uint8 calibration, once the model has loaded."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FileObject(BaseModel):
    """OpenAI's File object (`status` and `status_details` are deprecated there, and kept)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    expires_at: int | None
    status: Literal["processed"] = "processed"
    status_details: None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchCreateRequest(BaseModel):
    """POST /v1/batches (parsed by batches.params; this model is the OpenAPI document's)."""

    input_file_id: str
    endpoint: Literal["/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrorData(BaseModel):
    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorData]


class BatchObject(BaseModel):
    """OpenAI's Batch object, every field of it (batches.records.batch_json writes it)."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    usage: dict[str, Any]
    metadata: dict[str, str] | None
    model: str | None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class EmbedSparseRequest(BaseModel):
    """TEI's POST /embed_sparse body (parsed by validation.parse_sparse_request; for the document)."""

    inputs: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, texts, token ids, or arrays of token ids. Must not be empty."
    )
    truncate: bool | None = Field(
        None, description="Cut an over-long input to the model's limit (default: the server's --truncate)."
    )
    truncation_direction: Literal["right", "Right"] = Field(
        "right", description="Only 'right' (the end is cut); 'left' is a 400."
    )
    prompt_name: str | None = Field(None, description="A prompt name of the model, as `input_type`.")
    model: str | None = Field(
        None,
        description="Extension: the model; by default the one served model that computes sparse vectors.",
    )


class SparseValue(BaseModel):
    index: int = Field(description="A token id (ascending, unique within an input).")
    value: float


class EmbedSparseResponse(RootModel[list[list[SparseValue]]]):
    """One list per input, in input order."""


class TEIErrorResponse(BaseModel):
    """TEI's error body, which /embed_sparse answers so that TEI's clients read it (design note 61)."""

    error: str
    error_type: Literal["validation", "empty", "overloaded", "unhealthy", "backend"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _dense_column(result: EmbeddingResult) -> list[Any]:
    """Each input's `embedding`: the dense vector as `output_dtype` and `encoding_format` ask, or an
    empty one where `outputs` leaves it out (the OpenAI SDK reads an empty list or string as such)."""
    if "dense" not in result.outputs:
        return ["" if result.encoding_format == "base64" else []] * len(result.token_counts)
    if result.packed is not None:
        return list(encode_vectors(result.packed, result.encoding_format))
    return list(encode_vectors(result.vectors, result.encoding_format))


def render_embeddings(result: EmbeddingResult, model_name: str) -> bytes:
    data: list[dict[str, Any]] = [
        {"object": "embedding", "index": i, "embedding": vector}
        for i, vector in enumerate(_dense_column(result))
    ]
    if result.sparse is not None:
        for item, sparse in zip(data, result.sparse, strict=True):
            item["sparse_embedding"] = {"indices": sparse.indices, "values": sparse.values}
    if result.colbert is not None:
        for item, vectors in zip(data, result.colbert, strict=True):
            item["colbert_embedding"] = encode_colbert(vectors, result.encoding_format)
    body = {
        "object": "list",
        "data": data,
        "model": model_name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def render_sparse(result: EmbeddingResult) -> bytes:
    """TEI's /embed_sparse answer, `[[{"index", "value"}, ...], ...]`: one list per input, its token ids
    ascending (the values are written as render_embeddings writes them, float32's shortest form)."""
    assert result.sparse is not None, "a job for /embed_sparse asks for the sparse output"
    body = [
        [
            {"index": index, "value": value}
            for index, value in zip(sparse.indices.tolist(), sparse.values, strict=True)
        ]
        for sparse in result.sparse
    ]
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def model_card(
    spec: ModelSpec,
    status: ModelStatus,
    backend: str | None,
    calibration: Calibration | None = None,
    *,
    ranges: bool = False,
) -> dict[str, Any]:
    """`ranges`: the calibration ranges too (a 4096-wide model's ten widths are ~500 KB of JSON: the
    list shows each card's digest only, design note 59)."""
    quantization = None
    if calibration is not None:
        widths = {str(width): _width_ranges(r) for width, r in calibration.ranges.items()} if ranges else None
        quantization = Quantization(calibration=calibration.digest, ranges=widths)
    return ModelCard(
        id=spec.id,
        created=spec.created,
        owned_by=spec.owned_by,
        supports=["embeddings"],
        dimensions=spec.dimensions,
        matryoshka_dimensions=list(spec.matryoshka_dimensions),
        max_input_tokens=spec.max_input_tokens,
        aliases=list(spec.aliases),
        family=spec.family,
        input_types=spec.input_types,
        default_instruction=spec.default_instruction,
        status=status,
        backend=backend,
        outputs=list(spec.outputs),
        output_dtypes=list(OUTPUT_DTYPES) if "dense" in spec.outputs else [],
        quantization=quantization,
    ).model_dump()


def _width_ranges(ranges: Ranges) -> WidthRanges:
    """Each float32 exactly (as the float64 it widens to): read back as float32, it is the same value."""
    low, high = ranges.astype(np.float64).tolist()
    return WidthRanges(min=low, max=high)
