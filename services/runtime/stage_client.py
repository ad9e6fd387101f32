"""The interface through which the router reaches stages.

The router holds one client per stage and never imports a stage package. A stage object
satisfies its protocol directly (the in-process case: `ditserve generate`); the gRPC and Ray
clients implement the same methods over the wire, so scheduling code never changes with the
transport."""

from __future__ import annotations

from typing import Callable, Protocol

from services.runtime.messages import (
    DecodeRequest,
    DecodeResponse,
    DenoiseRequest,
    DenoiseResponse,
    EncodeRequest,
    EncodeResponse,
)

# Called after each denoising step with (steps_done, steps_total).
StepCallback = Callable[[int, int], None]


class EncoderClient(Protocol):
    def encode(self, request: EncodeRequest) -> EncodeResponse: ...


class DenoiserClient(Protocol):
    def denoise(self, request: DenoiseRequest, on_step: StepCallback | None = None) -> DenoiseResponse: ...


class VaeClient(Protocol):
    def decode(self, request: DecodeRequest) -> DecodeResponse: ...
