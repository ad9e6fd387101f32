"""Z-Image (Z-Image-Turbo's layout): a Qwen3 prompt encoder, the single-stream Z-Image DiT, and
AutoencoderKL (scaling and shift factors)."""

from __future__ import annotations

from services.runtime.spec import CfgRule, GenerationDefaults, PipelineSpec


def _z_image_defaults(model) -> GenerationDefaults:
    # ZImagePipeline.__call__'s defaults: 50 steps, guidance 5.0 (CFG against "" unless a negative
    # prompt is given; Turbo is run with 8 steps and 0.0), 1024 x 1024 whatever the VAE (the
    # pipeline's `height or 1024`), 512 text tokens, cfg_normalization off, cfg_truncation 1.0.
    return GenerationDefaults(50, 5.0, 1024, 1024, 512)


Z_IMAGE = PipelineSpec(
    family="z_image",
    pipeline_classes=("ZImagePipeline",),
    prompt_encoder="qwen3",
    encoder_components=("tokenizer", "text_encoder"),
    denoiser="z_image",
    denoiser_components=("transformer", "scheduler"),
    vae_components=("vae",),
    latent_patch=2,
    # Caption RoPE positions run to the padded caption length + 1, below axes_lens[0] = 1024 in
    # the released checkpoints: 992 tokens pad to 992; 993 would pad to 1024 and overflow.
    max_sequence_length_limit=992,
    defaults=_z_image_defaults,
    features=frozenset({"lora", "cache", "negative_prompt"}),
    cfg=CfgRule(scale="guidance_scale", threshold=0.0, empty_negative=True, from_cond=True),
    timestep="reversed",
    fp32_latents=True,
    sigma_linspace="torch",
)
