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


class ModelNotFoundError(DitserveError):
    """The model path does not exist or holds no diffusers pipeline."""

    code = "model_not_found"


class UnsupportedModelError(DitserveError):
    """The checkpoint is readable but no pipeline spec serves its class."""

    code = "unsupported_model"


class ModelLoadError(DitserveError):
    """A component of a recognised checkpoint failed to load (missing/mismatched weights)."""

    code = "model_load_error"
