"""gRPC adapter for the denoiser stage (ditserve.v1.Denoiser); no logic lives here.

The stage runs on a helper thread so that its per-step progress can be streamed while it
works; a client that disconnects stops the loop at the next step."""

from __future__ import annotations

import queue
import threading

from services.runtime import wire
from services.runtime.codec import tensor_chunks
from services.runtime.errors import RequestCancelledError
from services.runtime.grpc_server import SerializedStage
from services.runtime.proto import common_pb2, stages_pb2, stages_pb2_grpc

_DONE = object()


class DenoiserService(stages_pb2_grpc.DenoiserServicer):
    def __init__(self, stage):
        self.stage = stage
        self.serial = SerializedStage()

    def Denoise(self, request, context):
        events: queue.Queue = queue.Queue()

        def on_step(done: int, total: int) -> None:
            if not context.is_active():
                raise RequestCancelledError("client went away mid-denoise")
            events.put(stages_pb2.DenoiseEvent(progress=common_pb2.Progress(step=done, total=total)))

        def run():
            try:
                req = wire.denoise_request_from_proto(request)
                events.put(self.serial.call(context, self.stage.denoise, req, on_step))
            except BaseException as exc:  # abort() raises; hand it to the RPC thread
                events.put(exc)
            finally:
                events.put(_DONE)

        threading.Thread(target=run, name="denoise", daemon=True).start()
        while (item := events.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, stages_pb2.DenoiseEvent):
                yield item
                continue
            if item.latents is not None:
                for chunk in tensor_chunks(item.latents):
                    yield stages_pb2.DenoiseEvent(latents=chunk)
            if item.images is not None:  # a whole pipeline ran here (the diffusers backend)
                for chunk in tensor_chunks(item.images):
                    yield stages_pb2.DenoiseEvent(images=chunk)
            if item.cache_stats is not None:
                yield stages_pb2.DenoiseEvent(cache_stats=wire.cache_stats_to_proto(item.cache_stats))
            yield stages_pb2.DenoiseEvent(metrics=wire.metrics_to_proto(item.metrics))

    def add_to(self, server) -> None:
        stages_pb2_grpc.add_DenoiserServicer_to_server(self, server)
