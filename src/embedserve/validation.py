"""Pure request validation. `parse_embedding_request` checks the body's shape before anything else runs;
the `check_*` functions check it against the resolved model and the server's limits. Each failure is an
InvalidRequest subclass naming the offending parameter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from embedserve.errors import (
    ContextLengthExceeded,
    EmptyInput,
    InvalidEncodingFormat,
    InvalidInputType,
    InvalidInstruction,
    InvalidJSON,
    InvalidOutputDtype,
    InvalidRequest,
    InvalidTokenId,
    InvalidType,
    MissingParameter,
    TooManyInputs,
    TooManyTokens,
    UnsupportedDimensions,
    UnsupportedOutput,
)
from embedserve.types import (
    OUTPUT_DTYPES,
    OUTPUT_NAMES,
    EmbeddingJob,
    EncodingFormat,
    OutputDtype,
    OutputName,
)

#: What a 400 for token ids that cannot be the model's own says to do.
FOREIGN_IDS_HINT = (
    "They look like another tokenizer's ids: LangChain's OpenAIEmbeddings, for one, "
    "sends tiktoken's unless it is created with check_embedding_ctx_length=False. Send the "
    "text, or the model's own ids (what its tokenizer makes of the text, special tokens "
    "included)."
)

INPUT_SHAPES = (
    "a string, an array of strings, an array of integers (token ids) or an array of arrays of integers"
)


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise InvalidJSON("The request body is empty; expected a JSON object.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_array(value: list[Any], where: str, field: str) -> tuple[int, ...]:
    if not value:
        raise EmptyInput(f"{where} is an empty token array; token arrays must not be empty.", param=field)
    if not all(_is_int(v) for v in value):
        raise InvalidType(f"{where} must contain only integers (token ids).", param=field)
    negative = next((v for v in value if v < 0), None)
    if negative is not None:
        raise InvalidTokenId(f"{where} holds the negative token id {negative}.", param=field)
    return tuple(value)


def _parse_input(
    value: Any, field: str = "input"
) -> tuple[tuple[str, ...] | None, tuple[tuple[int, ...], ...] | None]:
    """-> (texts, token id arrays); exactly one is set. `field`: the body's name for it, for the messages."""
    if isinstance(value, str):
        if value == "":
            raise EmptyInput(f"'{field}' must not be an empty string.", param=field)
        return (value,), None
    if not isinstance(value, list):
        raise InvalidType(f"'{field}' must be {INPUT_SHAPES}.", param=field)
    if not value:
        raise EmptyInput(f"'{field}' must not be an empty array.", param=field)
    if all(isinstance(v, str) for v in value):
        empty = next((i for i, v in enumerate(value) if v == ""), None)
        if empty is not None:
            raise EmptyInput(
                f"{field}[{empty}] is an empty string; every input must be non-empty.", param=field
            )
        return tuple(value), None
    if all(_is_int(v) for v in value):
        return None, (_token_array(value, f"'{field}'", field),)
    if all(isinstance(v, list) for v in value):
        return None, tuple(_token_array(v, f"{field}[{i}]", field) for i, v in enumerate(value))
    raise InvalidType(f"'{field}' must be {INPUT_SHAPES}; mixed arrays are not accepted.", param=field)


def parse_embedding_request(payload: Any, *, max_inputs: int) -> EmbeddingJob:
    """The body of POST /v1/embeddings -> EmbeddingJob. Unknown fields are ignored."""
    if not isinstance(payload, dict):
        raise InvalidType("The request body must be a JSON object.")
    model = payload.get("model")
    if model is None:
        raise MissingParameter("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidType("'model' must be a non-empty string.", param="model")
    if payload.get("input") is None:
        raise MissingParameter("You must provide an input parameter.", param="input")
    texts, token_ids = _parse_input(payload["input"])
    encoding_format = payload.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    if encoding_format not in ("float", "base64"):
        raise InvalidEncodingFormat(
            f"'encoding_format' must be 'float' or 'base64', got {encoding_format!r}.",
            param="encoding_format",
        )
    fmt: EncodingFormat = "base64" if encoding_format == "base64" else "float"
    dimensions = payload.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise InvalidType("'dimensions' must be a positive integer.", param="dimensions")
    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidType("'user' must be a string.", param="user")
    input_type = payload.get("input_type")
    if input_type is not None and (not isinstance(input_type, str) or not input_type):
        raise InvalidInputType(
            "'input_type' must be a string such as 'query' or 'document'.", param="input_type"
        )
    instruction = payload.get("instruction")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise InvalidInstruction(
            "'instruction' must be a non-empty string: the task of the query.", param="instruction"
        )
    job = EmbeddingJob(
        model=model,
        texts=texts,
        token_ids=token_ids,
        encoding_format=fmt,
        dimensions=dimensions,
        user=user,
        input_type=input_type,
        instruction=instruction,
        outputs=_parse_outputs(payload.get("outputs")),
        output_dtype=_parse_output_dtype(payload.get("output_dtype")),
    )
    if job.count > max_inputs:
        raise TooManyInputs(
            f"'input' holds {job.count} items; at most {max_inputs} are allowed per request.", param="input"
        )
    return job


def parse_sparse_request(payload: Any, *, sparse_models: Sequence[str], max_inputs: int) -> EmbeddingJob:
    """The body of TEI's POST /embed_sparse -> the job of a /v1/embeddings request asking for the sparse
    output alone: `inputs` as `input`, `prompt_name` as `input_type`, `truncate` for this request. The
    `model` extension names the model; without it, the one model in `sparse_models` (those the caller
    may use that compute sparse vectors). Unknown fields are ignored, as TEI ignores them."""
    if not isinstance(payload, dict):
        raise InvalidType("The request body must be a JSON object.")
    if payload.get("inputs") is None:
        raise MissingParameter("You must provide an inputs parameter.", param="inputs")
    texts, token_ids = _parse_input(payload["inputs"], "inputs")
    truncate = payload.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise InvalidType("'truncate' must be true or false.", param="truncate")
    direction = payload.get("truncation_direction")
    if direction is not None and direction not in ("right", "Right"):
        # Only the end of an over-long input is cut (as --truncate cuts it); 'left' would need the
        # tokenizer to keep the end instead, which no other route asks for.
        raise InvalidRequest(
            f"'truncation_direction' must be 'right' (the end of an over-long input is cut), "
            f"got {direction!r}.",
            param="truncation_direction",
        )
    prompt_name = payload.get("prompt_name")
    if prompt_name is not None and (not isinstance(prompt_name, str) or not prompt_name):
        raise InvalidInputType("'prompt_name' must be a prompt name of the model.", param="prompt_name")
    model = payload.get("model")
    if model is None:
        model = _only_sparse_model(sparse_models)
    elif not isinstance(model, str) or not model:
        raise InvalidType("'model' must be a non-empty string.", param="model")
    job = EmbeddingJob(
        model=model,
        texts=texts,
        token_ids=token_ids,
        encoding_format="float",
        dimensions=None,
        user=None,
        input_type=prompt_name,
        outputs=("sparse",),
        truncate=truncate,
    )
    if job.count > max_inputs:
        raise TooManyInputs(
            f"'inputs' holds {job.count} items; at most {max_inputs} are allowed per request.", param="inputs"
        )
    return job


def _only_sparse_model(sparse_models: Sequence[str]) -> str:
    """TEI serves one model, so its clients name none: the one here that computes sparse vectors."""
    if len(sparse_models) == 1:
        return sparse_models[0]
    if not sparse_models:
        raise UnsupportedOutput("No model served here computes sparse vectors.", param="model")
    raise MissingParameter(
        f"Several served models compute sparse vectors ({', '.join(sparse_models)}); name one in 'model'.",
        param="model",
    )


def _parse_outputs(value: Any) -> tuple[OutputName, ...]:
    """Extension `outputs`: a non-empty array of distinct names among OUTPUT_NAMES (None: dense)."""
    if value is None:
        return ("dense",)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidType(
            f"'outputs' must be a non-empty array of output names, among {list(OUTPUT_NAMES)}.",
            param="outputs",
        )
    unknown = [v for v in value if v not in OUTPUT_NAMES]
    if unknown:
        raise UnsupportedOutput(
            f"'outputs' holds {unknown[0]!r}; the outputs are {list(OUTPUT_NAMES)}.", param="outputs"
        )
    if len(set(value)) != len(value):
        raise InvalidType("'outputs' names an output twice.", param="outputs")
    return tuple(name for name in OUTPUT_NAMES if name in value)


def _parse_output_dtype(value: Any) -> OutputDtype:
    """Extension `output_dtype` (sentence-transformers' precisions; None: float32)."""
    if value is None:
        return "float32"
    for dtype in OUTPUT_DTYPES:
        if value == dtype:
            return dtype
    raise InvalidOutputDtype(
        f"'output_dtype' must be one of {list(OUTPUT_DTYPES)}, got {value!r}.", param="output_dtype"
    )


def check_outputs(outputs: Sequence[OutputName], *, model: str, available: Sequence[OutputName]) -> None:
    """Every output asked is one the model computes."""
    missing = [name for name in outputs if name not in available]
    if missing:
        raise UnsupportedOutput(
            f"The model '{model}' does not compute the output {missing[0]!r}: its outputs are "
            f"{list(available)}.",
            param="outputs",
        )


def check_dimensions(dimensions: int | None, *, model: str, native: int, allowed: Sequence[int]) -> None:
    if dimensions is None:
        return
    if not allowed:
        raise UnsupportedDimensions(
            f"The model '{model}' does not support the 'dimensions' parameter: it is not a "
            f"Matryoshka model and always returns {native} dimensions.",
            param="dimensions",
        )
    if dimensions not in allowed:
        raise UnsupportedDimensions(
            f"'dimensions' must be one of {list(allowed)} for the model '{model}', got {dimensions}.",
            param="dimensions",
        )


def check_token_ids(arrays: Sequence[Sequence[int]], *, vocab_size: int, model: str) -> None:
    for i, ids in enumerate(arrays):
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise InvalidTokenId(
                f"input[{i}] holds token id {bad}, outside the vocabulary of the model '{model}' "
                f"(valid ids are 0 to {vocab_size - 1}). {FOREIGN_IDS_HINT}",
                param="input",
            )


def check_framing(
    arrays: Sequence[Sequence[int]], *, head: Sequence[int], tail: Sequence[int], shown: str, model: str
) -> None:
    """Every id array carries the special tokens the model's tokenizer puts around every text
    (`shown`: how to say them, e.g. "[CLS] (101) ... [SEP] (102)"): without them, the ids are not
    the model's own, and would embed as something else than any text."""
    for i, ids in enumerate(arrays):
        if (
            tuple(ids[: len(head)]) != tuple(head)
            or tuple(ids[len(ids) - len(tail) :]) != tuple(tail)
            or len(ids) < len(head) + len(tail)
        ):
            raise InvalidTokenId(
                f"input[{i}] is not framed as {shown}, as every sequence of the model '{model}' is. "
                f"{FOREIGN_IDS_HINT}",
                param="input",
            )


def check_lengths(
    sequences: list[list[int]],
    *,
    model: str,
    max_tokens: int,
    truncate: bool,
    max_total: int,
    keep_last: bool = False,
    fits: int | None = None,
    partial: bool = False,
) -> list[list[int]]:
    """Per-input context limit (or cut, when the server truncates; `keep_last` keeps the final token,
    e.g. the EOS a model pools on), then what the memory budget fits (`fits`: the longest input whose
    forward pass fits it), then the per-request total. `partial`: tokenization stopped early, so the
    last length and the total are only lower bounds."""
    out = sequences
    for i, ids in enumerate(sequences):
        at_least = "at least " if partial and i == len(sequences) - 1 else ""
        if len(ids) > max_tokens:
            if not truncate:
                raise ContextLengthExceeded(
                    f"input[{i}] is {at_least}{len(ids)} tokens long, but the model '{model}' accepts at "
                    f"most {max_tokens} tokens per input. Shorten or split it.",
                    param="input",
                )
            if out is sequences:
                out = list(sequences)
            ids = out[i] = [*ids[: max_tokens - 1], ids[-1]] if keep_last else ids[:max_tokens]
        if fits is not None and len(ids) > fits:
            raise ContextLengthExceeded(
                f"input[{i}] is {at_least}{len(ids)} tokens long, but this server's memory budget for a "
                f"forward pass (--max-batch-memory) fits inputs of at most {fits} tokens on the model "
                f"'{model}'. Shorten or split it.",
                param="input",
            )
    total = sum(len(ids) for ids in out)
    if total > max_total:
        at_least = "at least " if partial else ""
        raise TooManyTokens(
            f"The request holds {at_least}{total} tokens in all; at most {max_total} are "
            "allowed per request. Split it into smaller requests.",
            param="input",
        )
    return out


__all__ = [
    "InvalidRequest",
    "check_dimensions",
    "check_lengths",
    "check_outputs",
    "check_token_ids",
    "parse_embedding_request",
    "parse_json",
    "parse_sparse_request",
]
