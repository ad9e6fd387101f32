"""gRPC adapter for the VAE stage (ditserve.v1.Vae); no logic lives here."""

from __future__ import annotations

from services.runtime import wire
from services.runtime.codec import tensor_chunks
from services.runtime.grpc_server import SerializedStage
from services.runtime.proto import stages_pb2, stages_pb2_grpc


class VaeService(stages_pb2_grpc.VaeServicer):
    def __init__(self, stage):
        self.stage = stage
        self.serial = SerializedStage()

    def Decode(self, request, context):
        response = self.serial.call(context, lambda: self.stage.decode(wire.decode_request_from_proto(request)))
        for chunk in tensor_chunks(response.images):
            yield stages_pb2.DecodeEvent(images=chunk)
        yield stages_pb2.DecodeEvent(metrics=wire.metrics_to_proto(response.metrics))

    def Encode(self, request, context):
        response = self.serial.call(context, lambda: self.stage.encode(wire.vae_encode_request_from_proto(request)))
        return wire.vae_encode_response_to_proto(response)

    def add_to(self, server) -> None:
        stages_pb2_grpc.add_VaeServicer_to_server(self, server)
