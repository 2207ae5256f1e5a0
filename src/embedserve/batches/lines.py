"""A batch's input file, checked line by line before any line runs (`InputCheck`), and the lines of its
output and error files (`output_line`, `error_line`). Pure: the caller reads the file and writes the
lines. What a line's body holds is checked when it runs, exactly as `POST /v1/embeddings` checks it."""

from __future__ import annotations

import secrets
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any

import orjson

from embedserve.batches.records import BatchError
from embedserve.errors import InvalidJSON, PayloadTooLarge
from embedserve.types import EmbeddingJob, EmbeddingResult
from embedserve.validation import parse_embedding_request

#: Validation errors kept of a file (the rest are counted in the last one): enough to fix a file by.
MAX_ERRORS = 1000
#: Tokens an input may make beyond one per byte of its text: the special tokens and a prompt's prefix.
TOKEN_SLACK = 64
#: Lines of one kind (the same model and options; texts, or token ids) run as one engine call of up to
#: this many inputs: a call of its own per line would cost the pipeline's per-request work each time.
GROUP_INPUTS = 32


@dataclass(frozen=True, slots=True)
class RequestLine:
    """A line that passed the checks: where it lies in the input file and what it may cost."""

    line: int  # 1-based
    custom_id: str
    offset: int
    length: int
    inputs: int
    token_bound: int  # no tokenizer makes more tokens of these inputs (a byte or an id is one at most)


def _inputs_of(value: object) -> tuple[int, int]:
    """(inputs, token bound) of a body's `input`, by its shape alone; a shape the embeddings route
    refuses counts one input, and fails when its line runs."""
    if isinstance(value, str):
        return 1, len(value.encode()) + TOKEN_SLACK
    if isinstance(value, list) and value:
        if all(isinstance(item, int) for item in value):
            return 1, len(value) + TOKEN_SLACK
        if all(isinstance(item, str) for item in value):
            return len(value), sum(len(item.encode()) for item in value) + TOKEN_SLACK * len(value)
        if all(isinstance(item, list) for item in value):
            return len(value), sum(len(item) for item in value) + TOKEN_SLACK * len(value)
    return 1, TOKEN_SLACK


@dataclass
class InputCheck:
    """Feed every line of the input file in order (`feed`), then read `errors` (empty: it may run) and
    `requests`. Checks each line's framing: a JSON object with a unique non-empty `custom_id`,
    `method` POST, `url` the batch's endpoint and an object `body`; and the file's size in lines and
    inputs."""

    endpoint: str
    max_requests: int
    max_inputs: int
    requests: list[RequestLine] = field(default_factory=list)
    errors: list[BatchError] = field(default_factory=list)
    model: str | None = None  # of the first line that names one
    inputs: int = 0
    token_bound: int = 0
    _lines: int = 0
    _dropped: int = 0  # errors beyond MAX_ERRORS
    _seen: set[str] = field(default_factory=set)

    def _fail(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(BatchError(code=code, message=message, line=line, param=param))
        else:
            self._dropped += 1

    def feed(self, raw: bytes, offset: int) -> None:
        """One line of the file (its bytes, the newline included or not) starting at `offset`."""
        self._lines += 1
        number = self._lines
        if not raw.strip():
            return  # a blank line (a trailing newline, say) is no request
        try:
            doc: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._fail(number, "invalid_json_line", f"Line {number} is not valid JSON.")
            return
        if not isinstance(doc, dict):
            self._fail(number, "invalid_json_line", f"Line {number} is not a JSON object.")
            return
        custom_id = doc.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            self._fail(
                number,
                "missing_custom_id",
                f"Line {number} has no custom_id (a non-empty string).",
                param="custom_id",
            )
            return
        if custom_id in self._seen:
            self._fail(
                number,
                "duplicate_custom_id",
                f"Line {number}: the custom_id {custom_id[:64]!r} is on an earlier line too; each "
                "request needs a custom_id of its own.",
                param="custom_id",
            )
            return
        self._seen.add(custom_id)
        if doc.get("method") != "POST":
            self._fail(number, "invalid_method", f"Line {number}: 'method' must be \"POST\".", param="method")
            return
        if doc.get("url") != self.endpoint:
            self._fail(
                number,
                "invalid_url",
                f"Line {number}: 'url' must be the batch's endpoint {self.endpoint!r}.",
                param="url",
            )
            return
        body = doc.get("body")
        if not isinstance(body, dict):
            self._fail(number, "invalid_body", f"Line {number}: 'body' must be a JSON object.", param="body")
            return
        if self.model is None and isinstance(body.get("model"), str):
            self.model = body["model"]
        inputs, bound = _inputs_of(body.get("input"))
        self.inputs += inputs
        self.token_bound += bound
        self.requests.append(RequestLine(number, custom_id, offset, len(raw), inputs, bound))

    def finish(self) -> list[BatchError]:
        """-> the file's errors (none: every line may run)."""
        if not self._lines or (not self.requests and not self.errors):
            self._fail(None, "empty_file", "The input file holds no request.")
        if len(self.requests) + len(self.errors) > self.max_requests:
            self._fail(
                None,
                "too_many_requests",
                f"The input file holds more than {self.max_requests} requests (this server's "
                "--batch-max-requests); split it into several batches.",
            )
        if self.inputs > self.max_inputs:
            self._fail(
                None,
                "too_many_inputs",
                f"The batch's requests hold {self.inputs} embedding inputs, more than {self.max_inputs} "
                "(this server's --batch-max-inputs); split it into several batches.",
            )
        if self._dropped:
            self.errors[-1] = BatchError(
                code=self.errors[-1].code,
                message=f"{self.errors[-1].message} ({self._dropped} more errors not listed)",
                line=self.errors[-1].line,
                param=self.errors[-1].param,
            )
        return self.errors


def line_job(raw: bytes, max_body_bytes: int, max_inputs: int) -> EmbeddingJob:
    """A checked line's body as POST /v1/embeddings would read it: the same limit on its size, the same
    validation (EmbedServeError as the route would raise)."""
    try:
        body = orjson.loads(raw)["body"]
    except orjson.JSONDecodeError:  # (validation parsed it: only a file changed since gets here)
        raise InvalidJSON("The line is not valid JSON.") from None
    if len(orjson.dumps(body)) > max_body_bytes:
        raise PayloadTooLarge(
            f"The request body is larger than the server's limit of {max_body_bytes} bytes. "
            "Split the input into several requests."
        )
    return parse_embedding_request(body, max_inputs=max_inputs)


def kind_of(job: EmbeddingJob) -> Hashable:
    """Jobs of one kind may run as one call: everything but their inputs is the same."""
    return (
        job.model,
        job.encoding_format,
        job.dimensions,
        job.input_type,
        job.instruction,
        job.outputs,
        job.output_dtype,
        job.texts is None,
    )


def merged(jobs: Sequence[EmbeddingJob]) -> EmbeddingJob:
    """Jobs of one kind as one, their inputs in order."""
    first = jobs[0]
    if first.texts is not None:
        return replace(first, texts=tuple(chain.from_iterable(job.texts or () for job in jobs)))
    return replace(first, token_ids=tuple(chain.from_iterable(job.token_ids or () for job in jobs)))


def part(result: EmbeddingResult, start: int, count: int) -> EmbeddingResult:
    """The answer of the inputs [start, start + count) of a merged job: one line's."""
    end = start + count
    return replace(
        result,
        vectors=result.vectors[start:end],
        token_counts=result.token_counts[start:end],
        packed=None if result.packed is None else result.packed[start:end],
        sparse=None if result.sparse is None else result.sparse[start:end],
        colbert=None if result.colbert is None else result.colbert[start:end],
    )


def new_request_id() -> str:
    return f"batch_req_{secrets.token_hex(16)}"


def output_line(custom_id: str, request_id: str, status: int, body: bytes) -> bytes:
    """A line of the output or error file: OpenAI's shape, the response body as the route renders it
    (`body`, JSON bytes: the vectors are never parsed again)."""
    head = orjson.dumps({"id": new_request_id(), "custom_id": custom_id})[:-1]
    response = b'{"status_code":%d,"request_id":%s,"body":%s}' % (status, orjson.dumps(request_id), body)
    return head + b',"response":' + response + b',"error":null}\n'


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """A line of the error file for a request that never ran (the batch was cancelled or expired)."""
    return (
        orjson.dumps(
            {
                "id": new_request_id(),
                "custom_id": custom_id,
                "response": None,
                "error": {"code": code, "message": message},
            }
        )
        + b"\n"
    )
