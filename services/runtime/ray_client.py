"""Stage and router clients over Ray Serve deployment handles (the third transport).

Same async methods as the in-process and gRPC clients. A replica that dies mid-call surfaces
as StageUnavailableError; errors the replica raised come back with their own type (Ray
re-raises the user exception class); a deadline cancels the call on the replica."""

from __future__ import annotations

import asyncio
import hashlib

from services.runtime.errors import DeadlineExceededError, DitserveError, StageUnavailableError
from services.runtime.stage_client import StepCallback


def _map(stage: str, exc: BaseException) -> BaseException:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    # Check the wrapper first: Ray's RayTaskError also subclasses the user's exception type,
    # but its message is the remote traceback; the original exception is its `cause`.
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, DitserveError):
        return exc.cause
    if isinstance(exc, DitserveError):
        return exc
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return StageUnavailableError(f"{stage} replica died: {str(exc).splitlines()[0]}")
    return StageUnavailableError(f"{stage} call failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")


async def _guarded(stage: str, call, work, timeout_s: float | None):
    """Await `work` (a handle call, or the consumption of a streaming one) within the deadline;
    cancel `call` on the replica when the deadline passes or our caller gives up."""
    try:
        return await asyncio.wait_for(work, timeout_s) if timeout_s else await work
    except asyncio.TimeoutError:
        call.cancel()
        raise DeadlineExceededError(f"{stage} call exceeded its deadline") from None
    except asyncio.CancelledError:
        call.cancel()
        raise
    except Exception as exc:
        raise _map(stage, exc) from None


async def _call(stage: str, response, timeout_s: float | None):
    return await _guarded(stage, response, response, timeout_s)


async def _stream(stage: str, gen, on_item, timeout_s: float | None):
    """Consume a streaming handle call item by item."""

    async def consume():
        async for item in gen:
            on_item(item)

    await _guarded(stage, gen, consume(), timeout_s)


async def _progress_then_result(stage: str, gen, on_step: StepCallback | None, timeout_s: float | None):
    """Consume a stream of (step, total) tuples ending in one result (streams.with_progress)."""
    result = []

    def on_item(item):
        if isinstance(item, tuple):
            if on_step is not None:
                on_step(*item)
        else:
            result.append(item)

    await _stream(stage, gen, on_item, timeout_s)
    if not result:
        raise StageUnavailableError(f"{stage} stream ended without a result")
    return result[0]


class RayStageClient:
    def __init__(self, stage: str, handle):
        self.stage, self.handle = stage, handle

    async def ready(self, timeout_s: float = 5.0) -> bool:
        try:
            return bool(await _call(self.stage, self.handle.ready.remote(), timeout_s))
        except DitserveError:
            return False

    async def close(self) -> None:
        return None

    async def encode(self, request, timeout_s: float | None = None):
        return await _call(self.stage, self.handle.encode.remote(request), timeout_s)

    async def decode(self, request, timeout_s: float | None = None):
        return await _call(self.stage, self.handle.decode.remote(request), timeout_s)

    async def encode_images(self, request, timeout_s: float | None = None):
        return await _call(self.stage, self.handle.encode_images.remote(request), timeout_s)

    async def denoise(self, request, on_step: StepCallback | None = None, timeout_s: float | None = None):
        options = {"stream": True}
        lora_set = lora_set_id(request)
        if lora_set:  # prefer a replica that has this set merged already (Ray Serve multiplexing)
            options["multiplexed_model_id"] = lora_set
        gen = self.handle.options(**options).denoise_stream.remote(request)
        return await _progress_then_result(self.stage, gen, on_step, timeout_s)


def lora_set_id(request) -> str:
    """A short id of a batch's LoRA set when every image has the same one (what a denoiser
    replica merges into its weights); "" for no LoRA or mixed sets."""
    sets = {tuple((a.path, a.strength) for a in refs) for refs in request.loras}
    if len(sets) != 1 or not next(iter(sets)):
        return ""
    return hashlib.sha1(repr(sorted(sets)).encode()).hexdigest()[:16]


class RayRouterClient:
    """The gateway's view of a router deployment (same methods as an in-process Router)."""

    def __init__(self, handle):
        self.handle = handle

    async def generate(self, request, on_step: StepCallback | None = None, timeout_s: float | None = None):
        gen = self.handle.options(stream=True).generate_stream.remote(request, timeout_s)
        # The router enforces the deadline itself (and answers 504); a small grace here only
        # guards against a router replica that stops answering.
        return await _progress_then_result("router", gen, on_step, timeout_s + 5 if timeout_s else None)

    async def metrics_text(self) -> str:
        return await _call("router", self.handle.metrics_text.remote(), 10)

    async def lora_admin(self, op: str, **fields) -> dict:
        return await _call("router", self.handle.lora_admin.remote(op, **fields), 60)

    async def check(self, request):
        return await _call("router", self.handle.check.remote(request), 30)

    async def ready(self) -> dict[str, bool]:
        try:
            return await _call("router", self.handle.ready.remote(), 10)
        except DitserveError:
            return {"router": False}
