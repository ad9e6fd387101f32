"""Wan text-to-video (WanPipeline): a UMT5 prompt encoder, the Wan DiT, and Wan's causal video
VAE. Wan 2.1 has one DiT; Wan 2.2 A14B two experts (transformer for the high-noise steps,
transformer_2 after the boundary timestep), both held by one denoiser replica.

Image-to-video (WanImageToVideoPipeline: Wan 2.1 I2V with its CLIP image encoder, Wan 2.2 I2V
A14B without one) conditions the same DiT on the first frame: the VAE stage encodes it as the
first frame of a black clip, whose latents and a first-frame mask join the noise's channels, and
Wan 2.1's CLIP tokens are cross-attended next to the text.

Wan 2.2 TI2V-5B (`expand_timesteps` in model_index.json, a 16x VAE) runs on the same specs: its DiT
takes a timestep per token, and its image-to-video replaces the first latent frame by the image's
latents (timestep 0 there) instead of adding input channels (services/denoiser/stage.py).

The first-last-frame variant is not served natively yet: `unserved` says so and `--backend auto`
serves it through the diffusers backend."""

from __future__ import annotations

import dataclasses

from services.runtime.spec import CfgRule, GenerationDefaults, ImageConditioning, PipelineSpec

# Wan's VAEs fold 4 frames into one latent frame (temperal_downsample [False, True, True]).
WAN_TEMPORAL_FACTOR = 4


def _wan_defaults(model) -> GenerationDefaults:
    # WanPipeline.__call__'s: 832x480, 81 frames, 50 steps, guidance 5.0, 512 UMT5 tokens; the
    # frame rate of Wan's examples (export_to_video(..., fps=16)).
    return GenerationDefaults(50, 5.0, 480, 832, 512, num_frames=81, fps=16)


def _unserved_layout(model) -> str | None:
    """What both pipelines need: the first transformer, both experts' parts or neither, and no
    per-token timesteps."""
    two_experts = model.has_component("transformer_2")
    if two_experts != (model.index.get("boundary_ratio") is not None):
        return "a transformer_2 without a boundary_ratio, or a boundary_ratio without a transformer_2"
    if not model.has_component("transformer"):
        return "a pipeline without its first transformer"
    return None


def _unserved(model) -> str | None:
    if (why := _unserved_layout(model)) is not None:
        return why
    if model.component_config("transformer").get("image_dim"):
        return "image conditioning (image_dim)"
    return None


def _unserved_i2v(model) -> str | None:
    if (why := _unserved_layout(model)) is not None:
        return why
    transformer = model.component_config("transformer")
    if transformer.get("pos_embed_seq_len"):
        return "the first-last-frame variant (pos_embed_seq_len)"
    if bool(transformer.get("image_dim")) != model.has_component("image_encoder"):
        return "image_dim without an image_encoder, or an image_encoder for a DiT without image_dim"
    if model.index.get("expand_timesteps") and transformer.get("in_channels") != transformer.get("out_channels"):
        return "per-token timesteps (expand_timesteps) with extra input channels"
    return None


WAN = PipelineSpec(
    family="wan",
    pipeline_classes=("WanPipeline",),
    prompt_encoder="umt5",
    encoder_components=("tokenizer", "text_encoder"),
    denoiser="wan",
    denoiser_components=("transformer", "scheduler"),
    vae_components=("vae",),
    latent_patch=2,  # the DiT's (1, 2, 2) patches: sizes are multiples of 8 x 2
    max_sequence_length_limit=512,
    defaults=_wan_defaults,
    features=frozenset({"negative_prompt", "video"}),
    frame_multiple=WAN_TEMPORAL_FACTOR,
    # WanPipeline: guidance_scale > 1 runs CFG, against "" without a negative prompt.
    cfg=CfgRule(scale="guidance_scale", threshold=1.0, empty_negative=True),
    timestep="raw",
    fp32_latents=True,  # prepare_latents(..., torch.float32)
    guidance_in_dit_dtype=True,  # noise_pred stays in the transformer's dtype
    sigma_linspace="scheduler",
    unserved=_unserved,
)

# WanImageToVideoPipeline: the same DiT family with 36 input channels (16 noise, 4 mask, 16 of the
# first frame's latents); its defaults are WanPipeline's (832x480, 81 frames), not the image's.
WAN_I2V = dataclasses.replace(
    WAN,
    family="wan_i2v",
    pipeline_classes=("WanImageToVideoPipeline",),
    prompt_encoder="umt5_i2v",
    encoder_components=("tokenizer", "text_encoder", "image_processor", "image_encoder"),
    features=WAN.features | {"image", "image_required"},
    image_conditioning=ImageConditioning(mode="first_frame", size_from=None),
    unserved=_unserved_i2v,
)
