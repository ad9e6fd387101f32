"""The error types every layer raises and every front end (CLI, REST, gRPC) translates.

Each carries a stable `code` so the gateway can map it to an OpenAI error object or a gRPC
status without parsing messages. Messages are one line and name the offending thing."""

from __future__ import annotations


class DitserveError(Exception):
    """Base class: a failure we expected and can explain to the caller in one line."""

    code = "internal_error"


class InvalidRequestError(DitserveError):
    """The request itself is wrong (bad size, empty prompt, steps < 1, ...)."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class NotFoundError(InvalidRequestError):
    """The request names something that does not exist (a video job id, ...)."""

    code = "not_found"


class ModelNotFoundError(DitserveError):
    """The model path does not exist or holds no diffusers pipeline."""

    code = "model_not_found"


class UnsupportedModelError(DitserveError):
    """The checkpoint is readable but no pipeline spec serves its class."""

    code = "unsupported_model"


class ModelLoadError(DitserveError):
    """A component of a recognised checkpoint failed to load (missing/mismatched weights)."""

    code = "model_load_error"


class QueueFullError(DitserveError):
    """The router's queue is at its limit; the client should retry later."""

    code = "queue_full"


class StageUnavailableError(DitserveError):
    """A stage worker could not be reached or died while serving the request."""

    code = "stage_unavailable"


class DeadlineExceededError(DitserveError):
    """The request did not finish within its deadline."""

    code = "deadline_exceeded"


class RequestCancelledError(DitserveError):
    """The client went away; the work was abandoned."""

    code = "cancelled"


# How each error surfaces over REST (status, OpenAI error `type`) and gRPC (status name).
# Anything not listed is an internal error: 500 / INTERNAL.
HTTP_STATUS = {
    InvalidRequestError: (400, "invalid_request_error"),
    NotFoundError: (404, "invalid_request_error"),
    ModelNotFoundError: (404, "invalid_request_error"),
    UnsupportedModelError: (400, "invalid_request_error"),
    ModelLoadError: (500, "server_error"),
    QueueFullError: (429, "rate_limit_error"),
    StageUnavailableError: (503, "server_error"),
    DeadlineExceededError: (504, "server_error"),
    RequestCancelledError: (499, "server_error"),
}
GRPC_STATUS = {
    InvalidRequestError: "INVALID_ARGUMENT",
    NotFoundError: "NOT_FOUND",
    ModelNotFoundError: "NOT_FOUND",
    UnsupportedModelError: "INVALID_ARGUMENT",
    ModelLoadError: "INTERNAL",
    QueueFullError: "RESOURCE_EXHAUSTED",
    StageUnavailableError: "UNAVAILABLE",
    DeadlineExceededError: "DEADLINE_EXCEEDED",
    RequestCancelledError: "CANCELLED",
}
_BY_CODE = {cls.code: cls for cls in HTTP_STATUS}


def lookup(table: dict, exc: BaseException, default):
    """`table`'s entry for the nearest class of `exc` (HTTP_STATUS, GRPC_STATUS), else `default`."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return default


def from_code(code: str, message: str) -> DitserveError:
    """Rebuild the typed error a remote stage reported (its `code` travels in gRPC metadata)."""
    return _BY_CODE.get(code, DitserveError)(message)
