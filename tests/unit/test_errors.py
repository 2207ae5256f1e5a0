"""The error tree and its one translator: every error class maps to a status, an OpenAI error `type` and
the `{"error": {...}}` body; HTTP errors raised by Starlette are mapped into the same tree."""

from __future__ import annotations

import orjson
import pytest
from starlette.exceptions import HTTPException

import embedserve.errors as errors_module
from embedserve.api.errors import (
    answer_error,
    error_body,
    error_response,
    from_http_exception,
    internal_error,
)
from embedserve.errors import (
    EmbedServeError,
    InsufficientStorage,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotReady,
    PayloadTooLarge,
    RateLimitExceeded,
    RouteNotFound,
    ServiceUnavailable,
)

# 408 / 431: the connection guard refuses a slow or oversized request head; 499: the client left (only
# the access log and the metrics ever see it).
ALLOWED_STATUSES = {400, 401, 403, 404, 405, 408, 409, 413, 429, 431, 499, 500, 503, 507}


def all_subclasses(cls: type) -> list[type]:
    found: list[type] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(all_subclasses(sub))
    return found


# The tree as defined in embedserve.errors (tests elsewhere may subclass it; those are not pinned here).
ERROR_CLASSES = [
    cls
    for cls in [EmbedServeError, *all_subclasses(EmbedServeError)]
    if cls.__module__ == errors_module.__name__
]


def test_the_error_tree_is_found() -> None:
    names = {cls.__name__ for cls in ERROR_CLASSES}
    assert {"InvalidRequest", "ModelNotFound", "ServiceUnavailable", "InternalError"} <= names


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_class_declares_a_known_status_and_a_type(cls: type[EmbedServeError]) -> None:
    assert isinstance(cls.status, int)
    assert not isinstance(cls.status, bool)
    assert cls.status in ALLOWED_STATUSES
    assert isinstance(cls.type, str)
    assert cls.type
    assert cls.code is None or (isinstance(cls.code, str) and cls.code)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_class_becomes_openai_error_json_with_its_status(cls: type[EmbedServeError]) -> None:
    exc = cls("something went wrong", param="input")
    body = orjson.loads(error_body(exc))
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"] == {
        "message": "something went wrong",
        "type": cls.type,
        "param": "input",
        "code": cls.code,
    }

    response = error_response(exc)
    assert response.status_code == cls.status
    assert response.media_type == "application/json"
    assert orjson.loads(response.body) == body


def test_an_error_without_param_has_a_null_param() -> None:
    body = orjson.loads(error_body(InvalidRequest("bad")))
    assert body["error"]["param"] is None


@pytest.mark.parametrize(
    "cls", [c for c in ERROR_CLASSES if issubclass(c, ServiceUnavailable)], ids=lambda cls: cls.__name__
)
def test_service_unavailable_responses_carry_retry_after(cls: type[ServiceUnavailable]) -> None:
    default = error_response(cls("busy"))
    assert default.status_code == 503
    assert default.headers["retry-after"] == "1"
    explicit = error_response(cls("busy", retry_after_s=7))
    assert explicit.headers["retry-after"] == "7"


def test_a_full_disk_is_507_with_retry_after_and_never_the_generic_500() -> None:
    response = answer_error(InsufficientStorage("disk full"), "req-1")
    assert response.status_code == 507
    assert response.headers["retry-after"] == "60"
    assert orjson.loads(response.body)["error"]["code"] == "insufficient_storage"


def test_model_not_ready_is_a_service_unavailable() -> None:
    assert issubclass(ModelNotReady, ServiceUnavailable)


@pytest.mark.parametrize(
    "cls",
    [
        c
        for c in ERROR_CLASSES
        if not issubclass(c, ServiceUnavailable | RateLimitExceeded | InsufficientStorage)
    ],
    ids=lambda cls: cls.__name__,
)
def test_other_errors_carry_no_retry_after(cls: type[EmbedServeError]) -> None:
    assert "retry-after" not in error_response(cls("x")).headers


def test_rate_limit_responses_are_429_with_the_limit_as_type_and_a_rounded_up_retry_after() -> None:
    response = error_response(RateLimitExceeded("slow down", limit="tokens", retry_after_s=1.2))
    assert response.status_code == 429
    assert orjson.loads(response.body)["error"] == {
        "message": "slow down",
        "type": "tokens",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert response.headers["retry-after"] == "2"  # whole seconds, never early
    assert response.headers["retry-after-ms"] == "1200"  # what the OpenAI SDKs read first
    assert "x-should-retry" not in response.headers


def test_a_request_that_can_never_fit_its_key_limit_tells_clients_not_to_retry() -> None:
    response = error_response(RateLimitExceeded("too large", limit="tokens", retry_after_s=None))
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    assert "retry-after" not in response.headers


@pytest.mark.parametrize(
    ("status", "cls", "words"),
    [
        (404, RouteNotFound, ["GET", "/v1/nowhere"]),
        (405, MethodNotAllowed, ["GET", "/v1/nowhere"]),
        (413, PayloadTooLarge, ["too big"]),
    ],
)
def test_starlette_http_errors_map_into_the_tree(
    status: int, cls: type[EmbedServeError], words: list[str]
) -> None:
    err = from_http_exception(HTTPException(status, detail="too big"), "GET", "/v1/nowhere")
    assert type(err) is cls
    assert err.status == status
    for word in words:
        assert word in err.message
    assert orjson.loads(error_response(err).body)["error"]["code"] == cls.code


def test_other_client_http_errors_keep_their_status_as_invalid_request() -> None:
    err = from_http_exception(HTTPException(418, detail="teapot"), "POST", "/x")
    assert isinstance(err, InvalidRequest)
    assert err.status == 418
    assert error_response(err).status_code == 418
    assert InvalidRequest.status == 400, "the class default must stay untouched"


def test_server_http_errors_become_internal_errors() -> None:
    err = from_http_exception(HTTPException(502, detail="upstream"), "POST", "/x")
    assert isinstance(err, InternalError)
    assert err.status == 500


def test_internal_error_quotes_the_request_id_and_nothing_else() -> None:
    err = internal_error("req-123")
    assert err.status == 500
    assert err.code == "internal_error"
    assert "req-123" in err.message
