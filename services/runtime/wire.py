"""Stage messages (services.runtime.messages) <-> their protobuf form (protos/ditserve/v1/stages.proto).

Both ends decode into the typed dataclasses, so a stage never sees a transport type."""

from __future__ import annotations

import torch

from services.runtime.codec import tensor_from_proto, tensor_to_proto
from services.runtime.device import StageMeasurement
from services.runtime.messages import (
    AdapterRef,
    CacheStats,
    Conditioning,
    DecodeRequest,
    DenoiseRequest,
    EncodeRequest,
    EncodeResponse,
    VaeEncodeRequest,
    VaeEncodeResponse,
)
from services.runtime.proto import common_pb2, stages_pb2


def metrics_to_proto(m: StageMeasurement) -> common_pb2.StageMetrics:
    return common_pb2.StageMetrics(seconds=m.seconds, peak_memory_bytes=m.peak_memory_bytes,
                                   peak_memory_by_rank=m.peak_memory_by_rank, lora_loads=m.lora_loads,
                                   lora_hits=m.lora_hits)


def metrics_from_proto(m: common_pb2.StageMetrics) -> StageMeasurement:
    return StageMeasurement(seconds=m.seconds, peak_memory_bytes=m.peak_memory_bytes,
                            peak_memory_by_rank=list(m.peak_memory_by_rank), lora_loads=m.lora_loads,
                            lora_hits=m.lora_hits)


def encode_request_to_proto(r: EncodeRequest) -> stages_pb2.EncodeRequest:
    return stages_pb2.EncodeRequest(prompts=r.prompts, max_sequence_length=r.max_sequence_length,
                                    images=[tensor_to_proto(t) for t in r.images])


def encode_request_from_proto(m: stages_pb2.EncodeRequest) -> EncodeRequest:
    return EncodeRequest(prompts=list(m.prompts), max_sequence_length=m.max_sequence_length,
                         images=[tensor_from_proto(t) for t in m.images])


def encode_response_to_proto(r: EncodeResponse) -> stages_pb2.EncodeResponse:
    return stages_pb2.EncodeResponse(
        prompt_embeds=tensor_to_proto(r.prompt_embeds),
        pooled_prompt_embeds=tensor_to_proto(r.pooled_prompt_embeds),
        metrics=metrics_to_proto(r.metrics),
        prompt_lengths=r.prompt_lengths.tolist() if r.prompt_lengths is not None else [],
        image_embeds=tensor_to_proto(r.image_embeds) if r.image_embeds is not None else None,
    )


def encode_response_from_proto(m: stages_pb2.EncodeResponse) -> EncodeResponse:
    return EncodeResponse(
        prompt_embeds=tensor_from_proto(m.prompt_embeds),
        pooled_prompt_embeds=tensor_from_proto(m.pooled_prompt_embeds),
        metrics=metrics_from_proto(m.metrics),
        prompt_lengths=torch.tensor(list(m.prompt_lengths), dtype=torch.int64) if m.prompt_lengths else None,
        image_embeds=tensor_from_proto(m.image_embeds) if m.HasField("image_embeds") else None,
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
        height=r.height,
        width=r.width,
        num_inference_steps=r.num_inference_steps,
        guidance_scale=r.guidance_scale,
        true_cfg_scale=r.true_cfg_scale,
        seeds=r.seeds,
        prompts=r.prompts,
        negative_prompts=r.negative_prompts,
        max_sequence_length=r.max_sequence_length,
        num_frames=r.num_frames,
        fps=r.fps,
        input_images=[tensor_to_proto(t) for t in r.input_images],
        cfg_normalization=r.cfg_normalization,
        cfg_truncation=r.cfg_truncation,
        reference_latents=[tensor_to_proto(t) for t in r.reference_latents],
        guidance_scale_2=r.guidance_scale_2,
    )
    if r.mask is not None:
        m.mask.CopyFrom(tensor_to_proto(r.mask))
    if r.image_embeds is not None:
        m.image_embeds.CopyFrom(tensor_to_proto(r.image_embeds))
    if r.positive is not None:
        m.positive.CopyFrom(_cond_to_proto(r.positive))
    if r.negative is not None:
        m.negative.CopyFrom(_cond_to_proto(r.negative))
    for refs in r.loras:
        m.sample_loras.add(adapters=[common_pb2.LoraAdapter(name=a.name, path=a.path, strength=a.strength)
                                     for a in refs])
    if r.cache is not None:
        m.cache.CopyFrom(cache_policy_to_proto(r.cache))
    return m


def cache_policy_to_proto(policy: dict) -> common_pb2.CachePolicy:
    """CachePolicy fields (None = unset) -> proto; the preset is a plain string ("" = none)."""
    fields = {k: v for k, v in policy.items() if v is not None}
    return common_pb2.CachePolicy(**fields)


def cache_policy_from_proto(m: common_pb2.CachePolicy) -> dict:
    out = {f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields if f.name != "preset" and m.HasField(f.name)}
    if m.preset:
        out["preset"] = m.preset
    return out


def cache_stats_to_proto(s: CacheStats) -> common_pb2.CacheStats:
    return common_pb2.CacheStats(computed_steps=s.computed_steps, cached_steps=s.cached_steps)


def cache_stats_from_proto(m: common_pb2.CacheStats) -> CacheStats:
    return CacheStats(computed_steps=m.computed_steps, cached_steps=m.cached_steps)


def denoise_request_from_proto(m: stages_pb2.DenoiseRequest) -> DenoiseRequest:
    return DenoiseRequest(
        positive=_cond_from_proto(m.positive) if m.HasField("positive") else None,
        negative=_cond_from_proto(m.negative) if m.HasField("negative") else None,
        height=m.height,
        width=m.width,
        num_inference_steps=m.num_inference_steps,
        guidance_scale=m.guidance_scale,
        true_cfg_scale=m.true_cfg_scale,
        seeds=list(m.seeds),
        loras=[[AdapterRef(a.name, a.path, a.strength) for a in sample.adapters] for sample in m.sample_loras],
        cache=cache_policy_from_proto(m.cache) if m.HasField("cache") else None,
        prompts=list(m.prompts),
        negative_prompts=list(m.negative_prompts),
        max_sequence_length=m.max_sequence_length,
        num_frames=m.num_frames,
        fps=m.fps,
        input_images=[tensor_from_proto(t) for t in m.input_images],
        mask=tensor_from_proto(m.mask) if m.HasField("mask") else None,
        cfg_normalization=m.cfg_normalization,
        cfg_truncation=m.cfg_truncation if m.HasField("cfg_truncation") else 1.0,
        reference_latents=[tensor_from_proto(t) for t in m.reference_latents],
        image_embeds=tensor_from_proto(m.image_embeds) if m.HasField("image_embeds") else None,
        guidance_scale_2=m.guidance_scale_2 if m.HasField("guidance_scale_2") else None,
    )


def decode_request_to_proto(r: DecodeRequest) -> stages_pb2.DecodeRequest:
    return stages_pb2.DecodeRequest(latents=tensor_to_proto(r.latents))


def decode_request_from_proto(m: stages_pb2.DecodeRequest) -> DecodeRequest:
    return DecodeRequest(latents=tensor_from_proto(m.latents))


def vae_encode_request_to_proto(r: VaeEncodeRequest) -> stages_pb2.VaeEncodeRequest:
    return stages_pb2.VaeEncodeRequest(images=[tensor_to_proto(t) for t in r.images], height=r.height,
                                       width=r.width, num_frames=r.num_frames)


def vae_encode_request_from_proto(m: stages_pb2.VaeEncodeRequest) -> VaeEncodeRequest:
    return VaeEncodeRequest(images=[tensor_from_proto(t) for t in m.images], height=m.height, width=m.width,
                            num_frames=m.num_frames)


def vae_encode_response_to_proto(r: VaeEncodeResponse) -> stages_pb2.VaeEncodeResponse:
    return stages_pb2.VaeEncodeResponse(latents=[tensor_to_proto(t) for t in r.latents],
                                        metrics=metrics_to_proto(r.metrics))


def vae_encode_response_from_proto(m: stages_pb2.VaeEncodeResponse) -> VaeEncodeResponse:
    return VaeEncodeResponse(latents=[tensor_from_proto(t) for t in m.latents], metrics=metrics_from_proto(m.metrics))
