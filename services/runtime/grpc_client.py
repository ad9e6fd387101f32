"""Stage clients over gRPC (grpc.aio): the router's view of remote encoder / denoiser / VAE workers.

Every transport failure becomes a typed DitserveError: a dead or unreachable worker is
StageUnavailableError (503 / UNAVAILABLE), a deadline is DeadlineExceededError, and an error
the worker raised comes back as the same type (its code travels in trailing metadata)."""

from __future__ import annotations

import grpc

from services.runtime import wire
from services.runtime.codec import GRPC_OPTIONS, KEEPALIVE_S, KEEPALIVE_TIMEOUT_S, TensorAssembler, keepalive_options
from services.runtime.errors import (
    DeadlineExceededError,
    DitserveError,
    RequestCancelledError,
    StageUnavailableError,
    from_code,
)
from services.runtime.grpc_server import ERROR_CODE_KEY
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
from services.runtime.proto import stages_pb2_grpc
from services.runtime.stage_client import StepCallback

# A replaced worker should be found again within a second or two, not after gRPC's default
# exponential backoff (which grows to 120 s).
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


def _typed_error(stage: str, address: str, err: grpc.aio.AioRpcError) -> DitserveError:
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return StageUnavailableError(f"{stage} worker at {address} unavailable: {err.details()}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"{stage} call exceeded its deadline")
    if code == grpc.StatusCode.CANCELLED:
        return RequestCancelledError(f"{stage} call cancelled")
    meta = dict(err.trailing_metadata() or ())
    if ERROR_CODE_KEY in meta:
        return from_code(meta[ERROR_CODE_KEY], err.details())
    return StageUnavailableError(f"{stage} worker at {address} failed: {code.name}: {err.details()}")


class _GrpcStage:
    stage = ""

    def __init__(self, address: str, keepalive: tuple[float, float] = (KEEPALIVE_S, KEEPALIVE_TIMEOUT_S)):
        """`keepalive`: (ping every s, drop after s unanswered), codec.keepalive_options."""
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS + _RECONNECT
                                                 + keepalive_options(*keepalive))

    async def close(self) -> None:
        await self.channel.close()

    async def ready(self, timeout_s: float = 2.0) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


class GrpcEncoderClient(_GrpcStage):
    stage = "encoder"

    def __init__(self, address: str, **kwargs):
        super().__init__(address, **kwargs)
        self.stub = stages_pb2_grpc.EncoderStub(self.channel)

    async def encode(self, request: EncodeRequest, timeout_s: float | None = None) -> EncodeResponse:
        try:
            reply = await self.stub.Encode(wire.encode_request_to_proto(request), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise _typed_error(self.stage, self.address, err) from None
        return wire.encode_response_from_proto(reply)


class GrpcDenoiserClient(_GrpcStage):
    stage = "denoiser"

    def __init__(self, address: str, **kwargs):
        super().__init__(address, **kwargs)
        self.stub = stages_pb2_grpc.DenoiserStub(self.channel)

    async def denoise(
        self, request: DenoiseRequest, on_step: StepCallback | None = None, timeout_s: float | None = None
    ) -> DenoiseResponse:
        latents, images = TensorAssembler(), TensorAssembler()
        metrics = cache_stats = None
        call = self.stub.Denoise(wire.denoise_request_to_proto(request), timeout=timeout_s)
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "progress" and on_step is not None:
                    on_step(event.progress.step, event.progress.total)
                elif kind == "latents":
                    latents.add(event.latents)
                elif kind == "images":
                    images.add(event.images)
                elif kind == "metrics":
                    metrics = wire.metrics_from_proto(event.metrics)
                elif kind == "cache_stats":
                    cache_stats = wire.cache_stats_from_proto(event.cache_stats)
        except grpc.aio.AioRpcError as err:
            raise _typed_error(self.stage, self.address, err) from None
        if metrics is None:
            raise StageUnavailableError(f"denoiser at {self.address} ended its stream without a result")
        return DenoiseResponse(latents=latents.tensor() if latents.header is not None else None, metrics=metrics,
                               cache_stats=cache_stats, images=images.tensor() if images.header is not None else None)


class GrpcVaeClient(_GrpcStage):
    stage = "vae"

    def __init__(self, address: str, **kwargs):
        super().__init__(address, **kwargs)
        self.stub = stages_pb2_grpc.VaeStub(self.channel)

    async def decode(self, request: DecodeRequest, timeout_s: float | None = None) -> DecodeResponse:
        images = TensorAssembler()
        metrics = None
        try:
            async for event in self.stub.Decode(wire.decode_request_to_proto(request), timeout=timeout_s):
                if event.WhichOneof("event") == "images":
                    images.add(event.images)
                else:
                    metrics = wire.metrics_from_proto(event.metrics)
        except grpc.aio.AioRpcError as err:
            raise _typed_error(self.stage, self.address, err) from None
        if metrics is None:
            raise StageUnavailableError(f"vae at {self.address} ended its stream without a result")
        return DecodeResponse(images=images.tensor(), metrics=metrics)

    async def encode_images(self, request: VaeEncodeRequest, timeout_s: float | None = None) -> VaeEncodeResponse:
        try:
            reply = await self.stub.Encode(wire.vae_encode_request_to_proto(request), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise _typed_error(self.stage, self.address, err) from None
        return wire.vae_encode_response_from_proto(reply)
