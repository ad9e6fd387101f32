"""Wan text-to-video (WanPipeline): a UMT5 prompt encoder, the Wan DiT, and Wan's causal video
VAE. Wan 2.1 has one DiT; Wan 2.2 A14B two experts (transformer for the high-noise steps,
transformer_2 after the boundary timestep), both held by one denoiser replica.

Wan 2.2 TI2V-5B (per-token timesteps, a 16x VAE) and the image-to-video pipelines are not served
natively yet: `unserved` says so and `--backend auto` serves those through the diffusers backend."""

from __future__ import annotations

from services.runtime.spec import CfgRule, GenerationDefaults, PipelineSpec

# Wan's VAEs fold 4 frames into one latent frame (temperal_downsample [False, True, True]).
WAN_TEMPORAL_FACTOR = 4


def _wan_defaults(model) -> GenerationDefaults:
    # WanPipeline.__call__'s: 832x480, 81 frames, 50 steps, guidance 5.0, 512 UMT5 tokens; the
    # frame rate of Wan's examples (export_to_video(..., fps=16)).
    return GenerationDefaults(50, 5.0, 480, 832, 512, num_frames=81, fps=16)


def _unserved(model) -> str | None:
    two_experts = model.index.get("transformer_2") not in (None, [None, None])
    if two_experts != (model.index.get("boundary_ratio") is not None):
        return "a transformer_2 without a boundary_ratio, or a boundary_ratio without a transformer_2"
    if model.index.get("transformer") in (None, [None, None]):
        return "a pipeline without its first transformer"
    if model.index.get("expand_timesteps"):
        return "Wan 2.2 TI2V's per-token timesteps (expand_timesteps)"
    if model.component_config("transformer").get("image_dim"):
        return "image conditioning (image_dim)"
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
