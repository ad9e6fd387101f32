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
    # Input images (uint8 [H, W, 3]) every prompt is encoded with: an edit model's encoder sees
    # them through its vision tower (spec.image_conditioning); empty for text-only encoding.
    images: list[torch.Tensor] = field(default_factory=list)


@dataclass
class EncodeResponse:
    # One row per prompt: [B, S, D] token embeddings and [B, P] pooled embeddings (P = 0 where
    # the family has none).
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    metrics: StageMeasurement = field(default_factory=StageMeasurement)
    # [B] real tokens per row where rows are zero-padded to the longest prompt (Qwen-Image, Z-Image);
    # None: every row is all real.
    prompt_lengths: torch.Tensor | None = None
    # [N, T, D] image-encoder tokens of the request's input images, shared by every prompt (Wan 2.1
    # I2V's CLIP hidden states); None where the family has no image encoder.
    image_embeds: torch.Tensor | None = None


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter as the denoiser receives it: the router has resolved and checked the path."""

    name: str
    path: str
    strength: float


@dataclass
class CacheStats:
    computed_steps: int = 0
    cached_steps: int = 0


@dataclass
class DenoiseRequest:
    # Batch size B = len(seeds); conditioning rows are already repeated to B. positive is None
    # in a whole-pipeline request (the diffusers backend), which carries the prompts instead.
    positive: Conditioning | None
    negative: Conditioning | None
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    seeds: list[int]
    # Empty, or one list per image (B entries): the adapters of that image.
    loras: list[list[AdapterRef]] = field(default_factory=list)
    # CachePolicy fields (services/runtime/cache_policy.py) shared by the whole batch; None: off.
    cache: dict | None = None
    # A whole-pipeline request: one prompt per image, negative prompts empty or one per image;
    # the worker encodes and decodes itself.
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    max_sequence_length: int = 0
    num_frames: int = 0  # > 0: a video pipeline's clip length (images come back [B, F, H, W, 3])
    fps: int = 0  # its frame rate (pipelines that condition on it, e.g. LTX)
    # Input images (uint8 [H, W, 3] each) and mask (uint8 [H, W]) shared by the batch.
    input_images: list[torch.Tensor] = field(default_factory=list)
    mask: torch.Tensor | None = None
    # ZImagePipeline's CFG limits (resolved: the request's or the model's defaults).
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    # A two-expert model's CFG scale on the low-noise expert's steps; None: guidance_scale.
    guidance_scale_2: float | None = None
    # Normalised latents of the batch's input images (the VAE stage's encode; spec.image_conditioning):
    # [C, h, w] per image whose tokens the DiT attends to ("tokens"), or the one first-frame clip's
    # [C, f, h, w] ("first_frame"); empty: none.
    reference_latents: list[torch.Tensor] = field(default_factory=list)
    # The encoder's image tokens [N, T, D] (EncodeResponse.image_embeds), the same for every image
    # of the batch and both CFG branches; None: none.
    image_embeds: torch.Tensor | None = None


@dataclass
class DenoiseResponse:
    # Unpacked latents [B, C, H/f, W/f] in the DiT's latent space (VAE scaling not undone);
    # None when the worker ran the whole pipeline and returns `images` instead.
    latents: torch.Tensor | None
    metrics: StageMeasurement = field(default_factory=StageMeasurement)
    cache_stats: CacheStats | None = None
    images: torch.Tensor | None = None  # uint8 [B, H, W, 3] (video: [B, F, H, W, 3]), as DecodeResponse.images


@dataclass
class DecodeRequest:
    latents: torch.Tensor


@dataclass
class DecodeResponse:
    # uint8 [B, H, W, 3], rounded exactly as diffusers' image processor does.
    images: torch.Tensor
    metrics: StageMeasurement = field(default_factory=StageMeasurement)


@dataclass
class VaeEncodeRequest:
    # Input images, uint8 [H, W, 3] each; the VAE stage resizes them as the family's pipeline does.
    images: list[torch.Tensor]
    # The requested output ("first_frame" conditioning encodes a clip of this size and length).
    height: int = 0
    width: int = 0
    num_frames: int = 0


@dataclass
class VaeEncodeResponse:
    # One normalised latent [C, h, w] per image, in the latent space the DiT samples in.
    latents: list[torch.Tensor]
    metrics: StageMeasurement = field(default_factory=StageMeasurement)
