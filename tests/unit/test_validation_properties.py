"""Properties of the request validator over arbitrary JSON (hypothesis): it never raises anything but an
InvalidRequest naming a real parameter, it accepts exactly the shapes the API documents, and what it
accepts it keeps unchanged and in order."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedserve.errors import InvalidRequest
from embedserve.types import EmbeddingJob
from embedserve.validation import parse_embedding_request, parse_json

MAX_INPUTS = 8
PARAMS = {"model", "input", "encoding_format", "dimensions", "user", "input_type", "instruction", None}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
token_ids = st.lists(st.integers(0, 2**31), min_size=1, max_size=6)
good_inputs = (
    st.text(min_size=1, max_size=30)
    | st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=MAX_INPUTS)
    | token_ids
    | st.lists(token_ids, min_size=1, max_size=MAX_INPUTS)
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(min_size=1, max_size=20) | json_values,
        "input": good_inputs | json_values,
        "encoding_format": st.sampled_from(["float", "base64", None]) | json_values,
        "dimensions": st.integers(1, 4096) | st.none() | json_values,
        "user": st.text(max_size=10) | st.none() | json_values,
        "input_type": st.sampled_from(["query", "document", None]) | json_values,
        "instruction": st.text(min_size=1, max_size=10) | st.none(),
        "extra": json_values,
    },
)


def _parse(payload: Any) -> EmbeddingJob | InvalidRequest:
    try:
        return parse_embedding_request(payload, max_inputs=MAX_INPUTS)
    except InvalidRequest as exc:
        return exc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=json_values | fields)
def test_any_json_gives_a_job_or_an_invalid_request_naming_a_real_parameter(payload: Any) -> None:
    outcome = _parse(payload)
    if isinstance(outcome, InvalidRequest):
        assert outcome.status == 400
        assert outcome.param in PARAMS
        assert outcome.message
        assert outcome.code
    else:
        assert isinstance(outcome, EmbeddingJob)


@settings(max_examples=150, deadline=None)
@given(payload=fields)
def test_accepted_inputs_are_kept_unchanged_and_in_order(payload: dict[str, Any]) -> None:
    outcome = _parse(payload)
    if not isinstance(outcome, EmbeddingJob):
        return
    given_input = payload["input"]
    if outcome.texts is not None:
        assert list(outcome.texts) == ([given_input] if isinstance(given_input, str) else given_input)
    else:
        assert outcome.token_ids is not None
        nested = given_input if isinstance(given_input[0], list) else [given_input]
        assert [list(ids) for ids in outcome.token_ids] == nested
    assert 1 <= outcome.count <= MAX_INPUTS
    assert outcome.model == payload["model"]
    assert outcome.encoding_format in ("float", "base64")


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_bytes_parse_to_json_or_an_invalid_request(body: bytes) -> None:
    outcome: object
    try:
        outcome = parse_json(body)
    except InvalidRequest as exc:
        outcome = exc
    if isinstance(outcome, InvalidRequest):
        assert (outcome.status, outcome.code) == (400, "invalid_json")


@pytest.mark.parametrize(
    "payload",
    [{"model": "m", "input": ["a"] * (MAX_INPUTS + 1)}, {"model": "m", "input": [[1]] * (MAX_INPUTS + 1)}],
)
def test_one_input_over_the_limit_is_refused(payload: dict[str, Any]) -> None:
    outcome = _parse(payload)
    assert isinstance(outcome, InvalidRequest)
    assert outcome.code == "too_many_inputs"
