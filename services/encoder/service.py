"""gRPC adapter for the encoder stage (ditserve.v1.Encoder); no logic lives here."""

from __future__ import annotations

from services.runtime import wire
from services.runtime.grpc_server import SerializedStage
from services.runtime.proto import stages_pb2_grpc


class EncoderService(stages_pb2_grpc.EncoderServicer):
    def __init__(self, stage):
        self.stage = stage
        self.serial = SerializedStage()

    def Encode(self, request, context):
        def run():
            return wire.encode_response_to_proto(self.stage.encode(wire.encode_request_from_proto(request)))

        return self.serial.call(context, run)

    def add_to(self, server) -> None:
        stages_pb2_grpc.add_EncoderServicer_to_server(self, server)
