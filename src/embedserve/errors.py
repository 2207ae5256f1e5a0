"""The one error tree. Each class declares the HTTP status, OpenAI error `type` and `code` it maps to;
api/errors.py is the only place that turns these into responses."""

from __future__ import annotations

import math


class EmbedServeError(Exception):
    """Base of every error the server raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:  # e.g. a framework 4xx we pass through with its own status
            self.status = status

    def headers(self) -> dict[str, str]:
        """Extra response headers (e.g. Retry-After)."""
        return {}


# ---- 400: the request itself is wrong -------------------------------------------------------------


class InvalidRequest(EmbedServeError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class MissingParameter(InvalidRequest):
    code = "missing_required_parameter"


class InvalidType(InvalidRequest):
    code = "invalid_type"


class EmptyInput(InvalidRequest):
    code = "empty_input"


class TooManyInputs(InvalidRequest):
    code = "too_many_inputs"


class TooManyTokens(InvalidRequest):
    code = "too_many_tokens"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class InvalidTokenId(InvalidRequest):
    code = "invalid_token_id"


class UnsupportedDimensions(InvalidRequest):
    code = "unsupported_dimensions"


class InvalidEncodingFormat(InvalidRequest):
    code = "invalid_encoding_format"


class InvalidInputType(InvalidRequest):
    code = "invalid_input_type"


class InvalidInstruction(InvalidRequest):
    code = "invalid_instruction"


class UnsupportedOutput(InvalidRequest):
    """An output (`outputs`) the model does not compute, or one the route cannot answer."""

    code = "unsupported_output"


class InvalidOutputDtype(InvalidRequest):
    code = "invalid_output_dtype"


# ---- 401 / 403 / 404 / 405 / 413 / 429 ------------------------------------------------------------


class AuthenticationFailed(EmbedServeError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(EmbedServeError):
    """A valid key that may not call this route (the management and usage routes need an admin key)."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class ModelNotFound(EmbedServeError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RouteNotFound(EmbedServeError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class KeyNotFound(EmbedServeError):
    status = 404
    type = "invalid_request_error"
    code = "key_not_found"


class FileNotFound(EmbedServeError):
    """No file of that id that the key may see (another key's file is not found, never forbidden)."""

    status = 404
    type = "invalid_request_error"
    code = "file_not_found"


class BatchNotFound(EmbedServeError):
    status = 404
    type = "invalid_request_error"
    code = "batch_not_found"


class MethodNotAllowed(EmbedServeError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(EmbedServeError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Conflict(EmbedServeError):
    """The object's state forbids the call: cancelling a batch that has ended, deleting a file that a
    running batch reads."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimitExceeded(EmbedServeError):
    """A key is over its requests or tokens per minute. `type` says which, as OpenAI's does. A request
    that could never fit (more tokens than the whole per-minute limit) says so and asks the client not
    to retry (`x-should-retry: false`, which the official SDKs obey)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        limit: str = "requests",
        retry_after_s: float | None = 1.0,
        param: str | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.type = limit  # "requests" | "tokens"
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {"x-should-retry": "false"}
        wait_ms = max(1, math.ceil(self.retry_after_s * 1000))
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s))), "retry-after-ms": str(wait_ms)}


class ClientDisconnected(EmbedServeError):
    """The client left before its answer was ready (nginx's 499). Nobody receives this response: the
    status shows in the access log and the metrics only."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"


# ---- 503: we cannot serve right now ---------------------------------------------------------------


class ServiceUnavailable(EmbedServeError):
    status = 503
    type = "server_error"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ModelNotReady(ServiceUnavailable):
    code = "model_not_ready"


class Overloaded(ServiceUnavailable):
    """The model's queue is full (`--max-queued-inputs`): refused at once, before any work."""

    code = "server_overloaded"


class RequestTimedOut(ServiceUnavailable):
    """The request ran past `--request-timeout`; its inputs that had not reached the model are dropped."""

    code = "request_timeout"


class ShuttingDown(ServiceUnavailable):
    """SIGTERM arrived: requests already in flight finish, new ones are turned away."""

    code = "shutting_down"


class RateLimitStoreUnavailable(ServiceUnavailable):
    """The shared rate-limit store (Redis) cannot be reached and `--rate-limit-fallback refuse` is set:
    a limited key's request is refused rather than served without its shared limit (unlimited keys are
    served)."""

    code = "rate_limit_store_unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    """The key store and usage ledger's database cannot be reached or opened (a server answers 503
    `service_unavailable` on the routes that need it; the CLI exits 1)."""


class InsufficientStorage(EmbedServeError):
    """The file store's disk is full (or down to its reserve, --files-min-free): an upload is refused and
    whatever it had written removed. A "come back later" (Retry-After), not a fault of ours."""

    status = 507
    type = "server_error"
    code = "insufficient_storage"

    def __init__(self, message: str, *, retry_after_s: int = 60, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


# ---- refused by the HTTP layer before the request reaches the app ---------------------------------


class HeadersTooLarge(EmbedServeError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class HeaderTimeout(EmbedServeError):
    status = 408
    type = "invalid_request_error"
    code = "header_timeout"


class MalformedRequest(InvalidRequest):
    """The bytes are not an HTTP/1.1 request the parser accepts: a bad Content-Length, Content-Length
    with Transfer-Encoding, a bad chunk size, a control character in a header, a method it does not
    know, an HTTP/2 preface or a TLS handshake. The connection is closed after the answer."""

    code = "invalid_http_request"


class WebSocketNotSupported(InvalidRequest):
    """An `Upgrade: websocket` request: the server speaks plain HTTP/1.1 only."""

    code = "websocket_not_supported"


# ---- 500 ------------------------------------------------------------------------------------------


class InternalError(EmbedServeError):
    status = 500
    type = "server_error"
    code = "internal_error"


# ---- start-up (never reaches a client) ------------------------------------------------------------


class ModelLoadError(EmbedServeError):
    """A model cannot be located, verified or loaded. Raised before the server accepts traffic; the CLI
    prints the message as one line and exits non-zero."""


class ConfigError(EmbedServeError):
    """Settings or a models file are inconsistent (duplicate ids, unknown pooling, ...)."""
