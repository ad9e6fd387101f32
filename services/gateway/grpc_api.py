"""The public gRPC API (ditserve.v1.Generation) on grpc.aio; talks to the router like REST does.

Errors end the call with the matching status (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED,
UNAVAILABLE, DEADLINE_EXCEEDED) and the typed code in trailing metadata. A client that
disconnects cancels its handler, which frees its batch slot."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.gateway.images import MIME_TYPES, encode_images
from services.gateway.video import MP4_MIME, encode_mp4
from services.runtime import metrics, wire
from services.runtime.codec import GRPC_OPTIONS, keepalive_options
from services.runtime.config import GenerateRequest
from services.runtime.errors import DitserveError, ModelNotFoundError
from services.runtime.grpc_server import ERROR_CODE_KEY, status_for
from services.runtime.proto import common_pb2, generation_pb2, generation_pb2_grpc
from services.runtime.streams import with_progress

SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


def request_from_proto(m: generation_pb2.GenerateRequest) -> GenerateRequest:
    def opt(name):
        return getattr(m, name) if m.HasField(name) else None

    lora = [dict(name=a.name, path=a.path or None, strength=a.strength if a.HasField("strength") else 1.0)
            for a in m.lora]
    return GenerateRequest.parse(
        prompt=m.prompt,
        negative_prompt=opt("negative_prompt"),
        width=opt("width"),
        height=opt("height"),
        num_inference_steps=opt("num_inference_steps"),
        guidance_scale=opt("guidance_scale"),
        true_cfg_scale=opt("true_cfg_scale"),
        cfg_normalization=opt("cfg_normalization"),
        cfg_truncation=opt("cfg_truncation"),
        guidance_scale_2=opt("guidance_scale_2"),
        seed=opt("seed"),
        n=m.n or 1,
        max_sequence_length=opt("max_sequence_length"),
        output_format=m.output_format or "png",
        lora=lora,
        cache=wire.cache_policy_from_proto(m.cache) if m.HasField("cache") else None,
        num_frames=opt("num_frames"),
        fps=opt("fps"),
        seconds=opt("seconds"),
        images=list(m.input_images),
        mask=opt("mask"),
    )


async def response_to_proto(result, model_id: str) -> generation_pb2.GenerateResponse:
    r = result.request
    images, videos = [], []
    if r.num_frames:  # a video model: one MP4 per seed
        blobs = await asyncio.to_thread(lambda: [encode_mp4(img.pixels, r.fps) for img in result.images])
        videos = [generation_pb2.Video(data=blob, mime_type=MP4_MIME, width=r.width, height=r.height, seed=img.seed,
                                       num_frames=r.num_frames, fps=r.fps)
                  for img, blob in zip(result.images, blobs)]
    else:
        blobs = await encode_images([img.pixels for img in result.images], r.output_format)
        images = [generation_pb2.Image(data=blob, mime_type=MIME_TYPES[r.output_format], width=r.width,
                                       height=r.height, seed=img.seed)
                  for img, blob in zip(result.images, blobs)]
    return generation_pb2.GenerateResponse(
        id=uuid.uuid4().hex,
        model=model_id,
        created=int(time.time()),
        total_seconds=result.total_seconds,
        images=images,
        videos=videos,
        stages=[
            generation_pb2.StageReport(stage=k, seconds=m.seconds, peak_memory_bytes=m.peak_memory_bytes)
            for k, m in result.stages.items()
        ],
        cache_stats=wire.cache_stats_to_proto(result.cache_stats) if result.cache_stats is not None else None,
    )


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, router, card):
        self.router, self.card = router, card

    def _check_model(self, m) -> None:
        if m.model not in ("", self.card.id):
            raise ModelNotFoundError(f"model '{m.model}' is not served here (serving '{self.card.id}')")


    async def _abort(self, context, exc: Exception):
        if not isinstance(exc, DitserveError):
            exc = DitserveError(f"internal error: {type(exc).__name__}: {exc}")
        context.set_trailing_metadata(((ERROR_CODE_KEY, exc.code),))
        await context.abort(status_for(exc), str(exc))

    async def Generate(self, request, context):
        t0, status = time.perf_counter(), "error"
        try:
            self._check_model(request)
            timeout = context.time_remaining()
            result = await self.router.generate(request_from_proto(request), timeout_s=timeout)
            status = "ok"
            return await response_to_proto(result, self.card.id)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as exc:
            status = getattr(exc, "code", "internal_error")
            await self._abort(context, exc)
        finally:
            metrics.REQUESTS.labels("grpc.Generate", self.card.id, status).inc()
            metrics.REQUEST_SECONDS.labels("grpc.Generate", self.card.id, status).observe(time.perf_counter() - t0)

    async def GenerateStream(self, request, context):
        try:
            self._check_model(request)
            req = request_from_proto(request)
            timeout = context.time_remaining()
            async for item in with_progress(lambda on_step: self.router.generate(req, on_step, timeout)):
                if isinstance(item, tuple):
                    yield generation_pb2.GenerateEvent(progress=common_pb2.Progress(step=item[0], total=item[1]))
                else:
                    yield generation_pb2.GenerateEvent(result=await response_to_proto(item, self.card.id))
        except asyncio.CancelledError:  # client went away; with_progress cancelled the request
            raise
        except Exception as exc:
            await self._abort(context, exc)

    async def ListModels(self, request, context):
        return generation_pb2.ListModelsResponse(
            models=[generation_pb2.Model(id=self.card.id, family=self.card.family,
                                         pipeline_class=self.card.pipeline_class)]
        )


async def start_public_grpc(router, card, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=GRPC_OPTIONS + keepalive_options())
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationService(router, card), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
