"""embedserve.validation: request shape checks, then checks against the model and the server's limits."""

from __future__ import annotations

import pytest

from embedserve.errors import (
    ContextLengthExceeded,
    EmptyInput,
    InvalidEncodingFormat,
    InvalidInputType,
    InvalidInstruction,
    InvalidJSON,
    InvalidRequest,
    InvalidTokenId,
    InvalidType,
    MissingParameter,
    TooManyInputs,
    TooManyTokens,
    UnsupportedDimensions,
)
from embedserve.types import EmbeddingJob
from embedserve.validation import (
    check_dimensions,
    check_lengths,
    check_token_ids,
    parse_embedding_request,
    parse_json,
)

MAX_INPUTS = 2048


def parse(payload: object, *, max_inputs: int = MAX_INPUTS) -> EmbeddingJob:
    return parse_embedding_request(payload, max_inputs=max_inputs)


def body(**fields: object) -> dict[str, object]:
    """A valid request body with `fields` overriding (or adding to) the defaults."""
    return {"model": "m", "input": "hello", **fields}


def without(key: str) -> dict[str, object]:
    payload = body()
    del payload[key]
    return payload


# ---- parse_json -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"   ", b"\n\t"])
def test_empty_body_is_invalid_json(raw: bytes) -> None:
    with pytest.raises(InvalidJSON) as info:
        parse_json(raw)
    assert info.value.status == 400
    assert info.value.code == "invalid_json"
    assert "empty" in info.value.message


@pytest.mark.parametrize("raw", [b"{", b"{'model': 'm'}", b"not json", b'{"a": 1,}', b"[1, 2"])
def test_malformed_body_is_invalid_json(raw: bytes) -> None:
    with pytest.raises(InvalidJSON) as info:
        parse_json(raw)
    assert info.value.status == 400
    assert "not valid JSON" in info.value.message


def test_valid_json_body_is_parsed() -> None:
    assert parse_json(b'{"model": "m", "input": ["a", "b"]}') == {"model": "m", "input": ["a", "b"]}


# ---- parse_embedding_request: the body and its fields --------------------------------------------


@pytest.mark.parametrize("payload", [[], [{"model": "m"}], "text", 42, 1.5, None, True])
def test_body_that_is_not_an_object_is_400(payload: object) -> None:
    with pytest.raises(InvalidType) as info:
        parse(payload)
    assert info.value.status == 400
    assert "JSON object" in info.value.message


@pytest.mark.parametrize("payload", [without("model"), body(model=None)])
def test_missing_or_null_model_is_missing_parameter(payload: object) -> None:
    with pytest.raises(MissingParameter) as info:
        parse(payload)
    assert info.value.param == "model"
    assert info.value.code == "missing_required_parameter"
    assert "model" in info.value.message


@pytest.mark.parametrize("model", ["", 1, 1.5, True, ["m"], {"id": "m"}])
def test_model_that_is_not_a_non_empty_string_is_400(model: object) -> None:
    with pytest.raises(InvalidType) as info:
        parse(body(model=model))
    assert info.value.param == "model"
    assert info.value.status == 400


@pytest.mark.parametrize("payload", [without("input"), body(input=None)])
def test_missing_or_null_input_is_missing_parameter(payload: object) -> None:
    with pytest.raises(MissingParameter) as info:
        parse(payload)
    assert info.value.param == "input"
    assert "input" in info.value.message


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        ("", EmptyInput, ["empty string"]),
        ([], EmptyInput, ["empty array"]),
        (["a", ""], EmptyInput, ["input[1]", "empty string"]),
        (["", "b", "c"], EmptyInput, ["input[0]"]),
        ([[1, 2], []], EmptyInput, ["input[1]", "empty token array"]),
        ([[]], EmptyInput, ["input[0]"]),
        ([1, -2, 3], InvalidTokenId, ["negative", "-2"]),
        ([[1, 2], [3, -7]], InvalidTokenId, ["input[1]", "-7"]),
        ([True, False], InvalidType, []),
        ([1, True], InvalidType, []),
        ([[1, True]], InvalidType, ["input[0]", "integers"]),
        ([[True]], InvalidType, ["integers"]),
        ([1.0, 2.0], InvalidType, []),
        ([1, 2.5], InvalidType, []),
        ([[1.0]], InvalidType, ["integers"]),
        (["a", 1], InvalidType, ["mixed"]),
        (["a", [1]], InvalidType, ["mixed"]),
        ([1, [2]], InvalidType, ["mixed"]),
        (["a", None], InvalidType, ["mixed"]),
        ([["a"]], InvalidType, ["integers"]),
        ({"text": "a"}, InvalidType, ["array"]),
        (5, InvalidType, ["array"]),
        (1.5, InvalidType, ["array"]),
        (True, InvalidType, ["array"]),
    ],
)
def test_bad_input_is_400_naming_input(value: object, error: type[InvalidRequest], words: list[str]) -> None:
    with pytest.raises(error) as info:
        parse(body(input=value))
    assert type(info.value) is error
    assert info.value.status == 400
    assert info.value.param == "input"
    for word in words:
        assert word in info.value.message


def test_empty_string_inside_array_is_400() -> None:
    with pytest.raises(EmptyInput) as info:
        parse(body(input=["x", "y", "", "z"]))
    assert info.value.code == "empty_input"
    assert "input[2]" in info.value.message


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        (["a"] * 3, 2),
        ([[1]] * 2049, 2048),
        (["t"] * 2049, MAX_INPUTS),
    ],
)
def test_more_inputs_than_max_inputs_is_400(value: object, limit: int) -> None:
    with pytest.raises(TooManyInputs) as info:
        parse(body(input=value), max_inputs=limit)
    assert info.value.param == "input"
    assert info.value.code == "too_many_inputs"
    assert str(limit) in info.value.message
    assert str(len(value)) in info.value.message  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [["a"] * 4, [[1]] * 4])
def test_exactly_max_inputs_is_accepted(value: object) -> None:
    assert parse(body(input=value), max_inputs=4).count == 4


def test_one_token_array_counts_as_one_input() -> None:
    job = parse(body(input=[1, 2, 3, 4, 5]), max_inputs=1)
    assert job.count == 1


@pytest.mark.parametrize("fmt", ["int8", "FLOAT", "", 5, ["float"], {"f": 1}, True])
def test_bad_encoding_format_is_400(fmt: object) -> None:
    with pytest.raises(InvalidEncodingFormat) as info:
        parse(body(encoding_format=fmt))
    assert info.value.param == "encoding_format"
    assert info.value.code == "invalid_encoding_format"
    assert "float" in info.value.message
    assert "base64" in info.value.message


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (body(), "float"),
        (body(encoding_format=None), "float"),
        (body(encoding_format="float"), "float"),
        (body(encoding_format="base64"), "base64"),
    ],
)
def test_encoding_format_defaults_to_float_and_null_means_float(payload: object, expected: str) -> None:
    assert parse(payload).encoding_format == expected


@pytest.mark.parametrize("dimensions", ["64", 64.0, 1.5, 0, -1, -64, True, False, [64]])
def test_dimensions_that_is_not_a_positive_integer_is_400(dimensions: object) -> None:
    with pytest.raises(InvalidType) as info:
        parse(body(dimensions=dimensions))
    assert info.value.param == "dimensions"
    assert "positive integer" in info.value.message


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(body(), None), (body(dimensions=None), None), (body(dimensions=1), 1), (body(dimensions=256), 256)],
)
def test_dimensions_null_or_positive_integer_is_accepted(payload: object, expected: int | None) -> None:
    assert parse(payload).dimensions == expected


@pytest.mark.parametrize("user", [1, 1.5, True, ["u"], {"id": "u"}])
def test_user_that_is_not_a_string_is_400(user: object) -> None:
    with pytest.raises(InvalidType) as info:
        parse(body(user=user))
    assert info.value.param == "user"


def test_unknown_fields_are_ignored() -> None:
    job = parse(body(temperature=0.5, extra={"x": [1]}, task="retrieval.query"))
    assert job == EmbeddingJob(
        model="m", texts=("hello",), token_ids=None, encoding_format="float", dimensions=None, user=None
    )


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (body(input="hello"), EmbeddingJob("m", ("hello",), None, "float", None, None)),
        (body(input=["a", "b c", " "]), EmbeddingJob("m", ("a", "b c", " "), None, "float", None, None)),
        (body(input=[0, 5, 7]), EmbeddingJob("m", None, ((0, 5, 7),), "float", None, None)),
        (
            body(input=[[1, 2], [3], [0, 0, 0]]),
            EmbeddingJob("m", None, ((1, 2), (3,), (0, 0, 0)), "float", None, None),
        ),
        (
            body(model="bge", input=["x"], encoding_format="base64", dimensions=128, user="alice"),
            EmbeddingJob("bge", ("x",), None, "base64", 128, "alice"),
        ),
    ],
)
def test_valid_body_gives_the_matching_job(payload: object, expected: EmbeddingJob) -> None:
    job = parse(payload)
    assert job == expected
    assert job.count == len(expected.texts or expected.token_ids or ())


# ---- check_dimensions ----------------------------------------------------------------------------


@pytest.mark.parametrize("allowed", [(), (64, 128, 256)])
def test_no_dimensions_is_always_accepted(allowed: tuple[int, ...]) -> None:
    check_dimensions(None, model="m", native=384, allowed=allowed)


def test_dimensions_on_a_model_without_matryoshka_is_400() -> None:
    with pytest.raises(UnsupportedDimensions) as info:
        check_dimensions(128, model="bge-m3", native=1024, allowed=())
    assert info.value.param == "dimensions"
    assert info.value.code == "unsupported_dimensions"
    assert "Matryoshka" in info.value.message
    assert "bge-m3" in info.value.message
    assert "1024" in info.value.message


@pytest.mark.parametrize("dimensions", [32, 100, 2048, 1])
def test_dimensions_outside_the_allowed_list_is_400_listing_them(dimensions: int) -> None:
    with pytest.raises(UnsupportedDimensions) as info:
        check_dimensions(dimensions, model="qwen", native=1024, allowed=(64, 128, 1024))
    assert info.value.param == "dimensions"
    assert "[64, 128, 1024]" in info.value.message
    assert str(dimensions) in info.value.message


@pytest.mark.parametrize("dimensions", [64, 128, 1024])
def test_dimensions_in_the_allowed_list_is_accepted(dimensions: int) -> None:
    check_dimensions(dimensions, model="qwen", native=1024, allowed=(64, 128, 1024))


# ---- check_token_ids -----------------------------------------------------------------------------


def test_token_id_equal_to_vocab_size_is_400_naming_the_index() -> None:
    with pytest.raises(InvalidTokenId) as info:
        check_token_ids([[1, 2], [3, 100]], vocab_size=100, model="m")
    assert info.value.param == "input"
    assert info.value.code == "invalid_token_id"
    assert "input[1]" in info.value.message
    assert "100" in info.value.message
    assert "99" in info.value.message


def test_token_ids_up_to_vocab_size_minus_one_are_accepted() -> None:
    check_token_ids([[0, 99], [50]], vocab_size=100, model="m")


# ---- check_lengths -------------------------------------------------------------------------------


def test_input_over_the_context_limit_is_context_length_exceeded() -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        check_lengths([[1] * 5, [1] * 9], model="m", max_tokens=8, truncate=False, max_total=1000)
    err = info.value
    assert err.status == 400
    assert err.code == "context_length_exceeded"
    assert err.param == "input"
    assert "input[1]" in err.message
    assert "9" in err.message
    assert "8" in err.message


def test_inputs_at_the_context_limit_pass_unchanged() -> None:
    seqs = [[1] * 8, [2] * 3]
    assert check_lengths(seqs, model="m", max_tokens=8, truncate=False, max_total=11) == seqs


def test_truncate_cuts_long_inputs_without_mutating_the_given_list() -> None:
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]]
    snapshot = [list(s) for s in seqs]
    out = check_lengths(seqs, model="m", max_tokens=3, truncate=True, max_total=1000)
    assert out == [[1, 2, 3], [6, 7], [8, 9, 10]]
    assert seqs == snapshot


def test_total_over_max_total_is_too_many_tokens() -> None:
    with pytest.raises(TooManyTokens) as info:
        check_lengths([[1] * 6, [1] * 5], model="m", max_tokens=10, truncate=False, max_total=10)
    assert info.value.param == "input"
    assert info.value.code == "too_many_tokens"
    assert "11" in info.value.message
    assert "10" in info.value.message


def test_total_is_counted_after_truncation() -> None:
    # 2 x 20 tokens before the cut, 2 x 5 after: within a total of 10.
    out = check_lengths([[1] * 20, [2] * 20], model="m", max_tokens=5, truncate=True, max_total=10)
    assert [len(s) for s in out] == [5, 5]
    with pytest.raises(TooManyTokens):
        check_lengths([[1] * 20, [2] * 20], model="m", max_tokens=5, truncate=True, max_total=9)


@pytest.mark.parametrize("input_type", [1, True, ["query"], {"t": "query"}, ""])
def test_input_type_that_is_not_a_non_empty_string_is_400(input_type: object) -> None:
    with pytest.raises(InvalidInputType) as info:
        parse(body(input_type=input_type))
    assert info.value.param == "input_type" and info.value.code == "invalid_input_type"


@pytest.mark.parametrize("instruction", [1, False, ["task"], "", "   "])
def test_instruction_that_is_not_a_non_empty_string_is_400(instruction: object) -> None:
    with pytest.raises(InvalidInstruction) as info:
        parse(body(input_type="query", instruction=instruction))
    assert info.value.param == "instruction" and info.value.code == "invalid_instruction"


def test_input_type_and_instruction_reach_the_job() -> None:
    job = parse(body(input_type="query", instruction="Find code"))
    assert (job.input_type, job.instruction) == ("query", "Find code")
    assert (parse(body(input_type=None, instruction=None)).input_type) is None


@pytest.mark.parametrize(("keep_last", "expected"), [(False, [1, 2, 3]), (True, [1, 2, 9])])
def test_truncation_can_keep_the_final_token(keep_last: bool, expected: list[int]) -> None:
    out = check_lengths(
        [[1, 2, 3, 4, 9]], model="m", max_tokens=3, truncate=True, max_total=100, keep_last=keep_last
    )
    assert out == [expected]
