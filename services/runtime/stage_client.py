"""The interface through which the router reaches stages, and its in-process implementation.

The router holds one async client per stage and never imports a stage package. Three
implementations share these methods: in-process (below: wraps a stage object, runs it on a
thread), gRPC (grpc_client.py) and Ray (a deployment handle). Step callbacks always run on the
caller's event loop, whatever thread the stage computes on."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, Protocol

from services.runtime.errors import RequestCancelledError
from services.runtime.messages import (
    DecodeRequest,
    DecodeResponse,
    DenoiseRequest,
    DenoiseResponse,
    EncodeRequest,
    EncodeResponse,
    VaeEncodeRequest,
    VaeEncodeResponse,
)

# Called after each denoising step with (steps_done, steps_total).
StepCallback = Callable[[int, int], None]


class EncoderClient(Protocol):
    async def encode(self, request: EncodeRequest, timeout_s: float | None = None) -> EncodeResponse: ...


class DenoiserClient(Protocol):
    async def denoise(
        self, request: DenoiseRequest, on_step: StepCallback | None = None, timeout_s: float | None = None
    ) -> DenoiseResponse: ...


class VaeClient(Protocol):
    async def decode(self, request: DecodeRequest, timeout_s: float | None = None) -> DecodeResponse: ...

    # Input images -> latents (image editing). Not `encode`: a Ray handle's methods share one
    # namespace with the encoder stage's.
    async def encode_images(self, request: VaeEncodeRequest, timeout_s: float | None = None) -> VaeEncodeResponse: ...


class _InProcess:
    """One call at a time on the wrapped stage (one model copy, one device), off the event loop."""

    def __init__(self, stage):
        self.stage = stage
        self._lock = threading.Lock()

    async def _run(self, fn, *args):
        def locked():
            with self._lock:
                return fn(*args)

        return await asyncio.to_thread(locked)

    async def ready(self, timeout_s: float = 2.0) -> bool:
        return True

    async def close(self) -> None:
        return None


class InProcessEncoder(_InProcess):
    async def encode(self, request: EncodeRequest, timeout_s: float | None = None) -> EncodeResponse:
        return await self._run(self.stage.encode, request)


class InProcessDenoiser(_InProcess):
    async def denoise(
        self, request: DenoiseRequest, on_step: StepCallback | None = None, timeout_s: float | None = None
    ) -> DenoiseResponse:
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()

        def step(done: int, total: int) -> None:
            # Runs on the stage thread: stop at the next step once the caller gave up.
            if cancelled.is_set():
                raise RequestCancelledError("request cancelled mid-denoise")
            if on_step is not None:
                loop.call_soon_threadsafe(on_step, done, total)

        try:
            return await self._run(self.stage.denoise, request, step)
        except asyncio.CancelledError:
            cancelled.set()
            raise


class InProcessVae(_InProcess):
    async def decode(self, request: DecodeRequest, timeout_s: float | None = None) -> DecodeResponse:
        return await self._run(self.stage.decode, request)

    async def encode_images(self, request: VaeEncodeRequest, timeout_s: float | None = None) -> VaeEncodeResponse:
        return await self._run(self.stage.encode, request)
