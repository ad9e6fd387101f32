"""Stage messages (services.runtime.messages) <-> their protobuf form (protos/ditserve/v1/stages.proto).

Both ends decode into the typed dataclasses, so a stage never sees a transport type."""

from __future__ import annotations

from services.runtime.codec import tensor_from_proto, tensor_to_proto
from services.runtime.device import StageMeasurement
from services.runtime.messages import (
    Conditioning,
    DecodeRequest,
    DenoiseRequest,
    EncodeRequest,
    EncodeResponse,
)
from services.runtime.proto import common_pb2, stages_pb2


def metrics_to_proto(m: StageMeasurement) -> common_pb2.StageMetrics:
    return common_pb2.StageMetrics(seconds=m.seconds, peak_memory_bytes=m.peak_memory_bytes)


def metrics_from_proto(m: common_pb2.StageMetrics) -> StageMeasurement:
    return StageMeasurement(seconds=m.seconds, peak_memory_bytes=m.peak_memory_bytes)


def encode_request_to_proto(r: EncodeRequest) -> stages_pb2.EncodeRequest:
    return stages_pb2.EncodeRequest(prompts=r.prompts, max_sequence_length=r.max_sequence_length)


def encode_request_from_proto(m: stages_pb2.EncodeRequest) -> EncodeRequest:
    return EncodeRequest(prompts=list(m.prompts), max_sequence_length=m.max_sequence_length)


def encode_response_to_proto(r: EncodeResponse) -> stages_pb2.EncodeResponse:
    return stages_pb2.EncodeResponse(
        prompt_embeds=tensor_to_proto(r.prompt_embeds),
        pooled_prompt_embeds=tensor_to_proto(r.pooled_prompt_embeds),
        metrics=metrics_to_proto(r.metrics),
    )


def encode_response_from_proto(m: stages_pb2.EncodeResponse) -> EncodeResponse:
    return EncodeResponse(
        prompt_embeds=tensor_from_proto(m.prompt_embeds),
        pooled_prompt_embeds=tensor_from_proto(m.pooled_prompt_embeds),
        metrics=metrics_from_proto(m.metrics),
    )


def _cond_to_proto(c: Conditioning) -> stages_pb2.Conditioning:
    return stages_pb2.Conditioning(
        prompt_embeds=tensor_to_proto(c.prompt_embeds), pooled_prompt_embeds=tensor_to_proto(c.pooled_prompt_embeds)
    )


def _cond_from_proto(m: stages_pb2.Conditioning) -> Conditioning:
    return Conditioning(
        prompt_embeds=tensor_from_proto(m.prompt_embeds), pooled_prompt_embeds=tensor_from_proto(m.pooled_prompt_embeds)
    )


def denoise_request_to_proto(r: DenoiseRequest) -> stages_pb2.DenoiseRequest:
    m = stages_pb2.DenoiseRequest(
        positive=_cond_to_proto(r.positive),
        height=r.height,
        width=r.width,
        num_inference_steps=r.num_inference_steps,
        guidance_scale=r.guidance_scale,
        true_cfg_scale=r.true_cfg_scale,
        seeds=r.seeds,
    )
    if r.negative is not None:
        m.negative.CopyFrom(_cond_to_proto(r.negative))
    return m


def denoise_request_from_proto(m: stages_pb2.DenoiseRequest) -> DenoiseRequest:
    return DenoiseRequest(
        positive=_cond_from_proto(m.positive),
        negative=_cond_from_proto(m.negative) if m.HasField("negative") else None,
        height=m.height,
        width=m.width,
        num_inference_steps=m.num_inference_steps,
        guidance_scale=m.guidance_scale,
        true_cfg_scale=m.true_cfg_scale,
        seeds=list(m.seeds),
    )


def decode_request_to_proto(r: DecodeRequest) -> stages_pb2.DecodeRequest:
    return stages_pb2.DecodeRequest(latents=tensor_to_proto(r.latents))


def decode_request_from_proto(m: stages_pb2.DecodeRequest) -> DecodeRequest:
    return DecodeRequest(latents=tensor_from_proto(m.latents))
