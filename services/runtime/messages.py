"""Typed stage messages: what the router sends each stage and what comes back.

These are the in-process form; the gRPC contract in protos/ mirrors them field for field and
the tensor codec converts at the boundary, so a stage never sees a transport type."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.runtime.device import StageMeasurement


@dataclass
class EncodeRequest:
    prompts: list[str]
    max_sequence_length: int


@dataclass
class EncodeResponse:
    # One row per prompt: [B, S, D] token embeddings and [B, P] pooled embeddings.
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    metrics: StageMeasurement = field(default_factory=StageMeasurement)


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor


@dataclass
class DenoiseRequest:
    # Batch size B = len(seeds); conditioning rows are already repeated to B.
    positive: Conditioning
    negative: Conditioning | None
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    seeds: list[int]


@dataclass
class DenoiseResponse:
    # Unpacked latents [B, C, H/f, W/f] in the DiT's latent space (VAE scaling not undone).
    latents: torch.Tensor
    metrics: StageMeasurement = field(default_factory=StageMeasurement)


@dataclass
class DecodeRequest:
    latents: torch.Tensor


@dataclass
class DecodeResponse:
    # uint8 [B, H, W, 3], rounded exactly as diffusers' image processor does.
    images: torch.Tensor
    metrics: StageMeasurement = field(default_factory=StageMeasurement)
