"""The pure parts of the Batch API: an input file's checks line by line (each error naming its line), the
create and list parameters, and the wire shapes (OpenAI's own models parse them)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import orjson
import pytest
from openai.types import Batch

from embedserve.batches.lines import TOKEN_SLACK, InputCheck, error_line, output_line
from embedserve.batches.params import parse_batch_create, parse_list_params, parse_metadata
from embedserve.batches.records import BatchError, BatchRecord, batch_json
from embedserve.errors import InvalidRequest, InvalidType, MissingParameter
from embedserve.types import EmbeddingJob

URL = "/v1/embeddings"


def line(custom_id: str | None = "a", body: Any = None, **fields: Any) -> bytes:
    doc: dict[str, Any] = {"method": "POST", "url": URL, "body": body or {"model": "m", "input": "hi"}}
    if custom_id is not None:
        doc["custom_id"] = custom_id
    doc.update(fields)
    return json.dumps(doc).encode() + b"\n"


def check(*raws: bytes, max_requests: int = 100, max_inputs: int = 100) -> InputCheck:
    checked = InputCheck(endpoint=URL, max_requests=max_requests, max_inputs=max_inputs)
    offset = 0
    for raw in raws:
        checked.feed(raw, offset)
        offset += len(raw)
    checked.finish()
    return checked


def test_good_lines_are_kept_with_their_place_in_the_file_and_their_cost() -> None:
    first, second = line("a"), line("b", {"model": "m", "input": ["héllo", "you"]})
    checked = check(first, b"\n", second)
    assert checked.errors == []
    assert [(r.line, r.custom_id, r.offset, r.length, r.inputs) for r in checked.requests] == [
        (1, "a", 0, len(first), 1),
        (3, "b", len(first) + 1, len(second), 2),
    ]
    assert checked.requests[1].token_bound == len("héllo".encode()) + 3 + 2 * TOKEN_SLACK
    assert checked.model == "m" and checked.inputs == 3


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{nope", "invalid_json_line"),
        (b"[1]", "invalid_json_line"),
        (line(None), "missing_custom_id"),
        (line(""), "missing_custom_id"),
        (line(7), "missing_custom_id"),  # type: ignore[arg-type]
        (line("x", method="GET"), "invalid_method"),
        (line("x", url="/v1/chat/completions"), "invalid_url"),
        (line("x", body=[1]), "invalid_body"),
    ],
)
def test_each_bad_line_is_an_error_naming_its_line(raw: bytes, code: str) -> None:
    checked = check(line("ok"), raw)
    assert [(e.line, e.code) for e in checked.errors] == [(2, code)]
    assert "2" in checked.errors[0].message


def test_a_duplicate_custom_id_names_the_later_line() -> None:
    checked = check(line("a"), line("b"), line("a"))
    assert [(e.line, e.code) for e in checked.errors] == [(3, "duplicate_custom_id")]


def test_the_files_limits_and_emptiness_are_errors_of_the_file() -> None:
    assert [e.code for e in check(line("a"), line("b"), max_requests=1).errors] == ["too_many_requests"]
    many = line("a", {"model": "m", "input": ["x"] * 3})
    assert [e.code for e in check(many, max_inputs=2).errors] == ["too_many_inputs"]
    assert [(e.line, e.code) for e in check().errors] == [(None, "empty_file")]
    assert [(e.line, e.code) for e in check(b"\n", b"  \n").errors] == [(None, "empty_file")]


def test_errors_past_the_cap_are_counted_in_the_last_one() -> None:
    checked = check(*[b"{bad\n"] * 1003, max_requests=10_000)
    assert len(checked.errors) == 1000
    assert checked.errors[-1].message.endswith("(3 more errors not listed)")


def test_output_and_error_lines_are_openais_shape_with_the_body_as_given() -> None:
    body = b'{"object":"list","data":[]}'
    row = orjson.loads(output_line("c-1", "req-1", 200, body))
    assert row["id"].startswith("batch_req_") and row["custom_id"] == "c-1" and row["error"] is None
    assert row["response"] == {
        "status_code": 200,
        "request_id": "req-1",
        "body": {"object": "list", "data": []},
    }
    never = orjson.loads(error_line("c-2", "batch_expired", "too late"))
    assert never["response"] is None and never["error"] == {"code": "batch_expired", "message": "too late"}


def test_create_parameters_are_checked_each_naming_itself() -> None:
    good = {"input_file_id": "file-1", "endpoint": URL, "completion_window": "24h", "metadata": {"a": "b"}}
    assert parse_batch_create(good).metadata == {"a": "b"}
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({**good, "endpoint": "/v1/completions"}, InvalidRequest, "endpoint"),
        ({**good, "completion_window": "48h"}, InvalidRequest, "completion_window"),
        ({k: v for k, v in good.items() if k != "input_file_id"}, MissingParameter, "input_file_id"),
        ({**good, "input_file_id": 3}, InvalidType, "input_file_id"),
        ({**good, "metadata": {"k" * 65: "v"}}, InvalidRequest, "metadata"),
        ({**good, "metadata": {"k": "v" * 513}}, InvalidRequest, "metadata"),
        ({**good, "metadata": [1]}, InvalidType, "metadata"),
        ({**good, "extra": 1}, InvalidRequest, "extra"),
    ]
    for payload, kind, param in cases:
        with pytest.raises(kind) as raised:
            parse_batch_create(payload)
        assert raised.value.param == param
    with pytest.raises(InvalidType):
        parse_batch_create([])
    assert parse_metadata({str(i): "v" for i in range(16)}) is not None
    with pytest.raises(InvalidRequest):
        parse_metadata({str(i): "v" for i in range(17)})


def test_list_parameters() -> None:
    assert parse_list_params({}) == (None, 20)
    assert parse_list_params({"after": "batch_1", "limit": "100"}) == ("batch_1", 100)
    for bad in ({"limit": "0"}, {"limit": "101"}, {"limit": "-1"}, {"limit": "ten"}, {"order": "asc"}):
        with pytest.raises(InvalidRequest):
            parse_list_params(bad)


def test_the_batch_object_has_every_field_of_openais_and_parses_as_one() -> None:
    record = BatchRecord(
        id="batch_1",
        owner="key",
        status="completed",
        endpoint=URL,
        input_file_id="file-1",
        completion_window="24h",
        metadata={"a": "b"},
        created_at=1,
        expires_at=2,
        errors=(BatchError(code="c", message="m", line=3),),
        output_file_id="file-2",
        error_file_id="file-3",
        output_bytes=10,
        total=4,
        completed=4,
        input_tokens=40,
        completed_at=2,
    )
    doc = batch_json(record)
    assert set(doc) == set(Batch.model_fields)
    parsed = Batch.model_validate(doc)
    assert parsed.output_file_id == "file-2" and parsed.error_file_id is None  # an empty error file is none
    assert parsed.usage is not None and parsed.usage.input_tokens == 40
    assert parsed.errors is not None and parsed.errors.data is not None and parsed.errors.data[0].line == 3
    assert doc["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    running = batch_json(replace(record, status="in_progress", completed_at=None))
    assert running["output_file_id"] is None  # not shown before the batch has ended


def test_lines_asking_for_other_outputs_never_share_an_engine_call() -> None:
    from embedserve.batches.lines import kind_of

    dense = EmbeddingJob(
        model="m", texts=("a",), token_ids=None, encoding_format="float", dimensions=None, user=None
    )
    assert kind_of(dense) != kind_of(replace(dense, outputs=("dense", "sparse")))
    assert kind_of(dense) != kind_of(replace(dense, output_dtype="binary"))
    assert kind_of(dense) == kind_of(replace(dense, texts=("b", "c")))


def test_a_lines_part_of_a_merged_answer_holds_its_own_outputs_only() -> None:
    import numpy as np

    from embedserve.batches.lines import part
    from embedserve.types import EmbeddingResult, SparseVector

    sparse = tuple(
        SparseVector(indices=np.asarray([i], dtype=np.int64), values=np.ones(1, np.float32)) for i in range(4)
    )
    colbert = tuple(np.full((i + 1, 2), i, dtype=np.float32) for i in range(4))
    result = EmbeddingResult(
        vectors=np.arange(8, dtype=np.float32).reshape(4, 2),
        encoding_format="float",
        token_counts=(1, 2, 3, 4),
        model_id="m",
        outputs=("dense", "sparse", "colbert"),
        output_dtype="ubinary",
        packed=np.arange(4, dtype=np.uint8).reshape(4, 1),
        sparse=sparse,
        colbert=colbert,
    )
    line_two = part(result, 1, 2)
    assert line_two.token_counts == (2, 3)
    assert line_two.vectors.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert line_two.packed is not None and line_two.packed.tolist() == [[1], [2]]
    assert line_two.sparse == sparse[1:3]
    assert line_two.colbert is not None and [c.shape for c in line_two.colbert] == [(2, 2), (3, 2)]
