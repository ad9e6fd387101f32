"""Z-Image (Z-Image-Turbo's layout): a Qwen3 prompt encoder, the single-stream Z-Image DiT, and
AutoencoderKL (scaling and shift factors)."""

from __future__ import annotations

from services.runtime.spec import CfgRule, GenerationDefaults, PipelineSpec

SEQ_MULTI_OF = 32  # diffusers' Z-Image pads image and caption token counts to multiples of this


def _z_image_defaults(model) -> GenerationDefaults:
    # ZImagePipeline.__call__'s defaults: 50 steps, guidance 5.0 (CFG against "" unless a negative
    # prompt is given; Turbo is run with 8 steps and 0.0), 1024 x 1024 whatever the VAE (the
    # pipeline's `height or 1024`), 512 text tokens, cfg_normalization off, cfg_truncation 1.0.
    # Caption RoPE positions run to the padded caption length + 1, which must stay below the
    # checkpoint's axes_lens[0] (1024 in the released ones: 992 tokens, padded to 992, fit; 993
    # would pad to 1024). A smaller table caps the text below the family's limit.
    positions = (model.component_config("transformer").get("axes_lens") or [1024])[0]
    limit = (positions - 2) // SEQ_MULTI_OF * SEQ_MULTI_OF
    return GenerationDefaults(50, 5.0, 1024, 1024, min(512, limit), text_limit=limit)


Z_IMAGE = PipelineSpec(
    family="z_image",
    pipeline_classes=("ZImagePipeline",),
    prompt_encoder="qwen3",
    encoder_components=("tokenizer", "text_encoder"),
    denoiser="z_image",
    denoiser_components=("transformer", "scheduler"),
    vae_components=("vae",),
    latent_patch=2,
    max_sequence_length_limit=992,  # the released checkpoints' (see _z_image_defaults)
    defaults=_z_image_defaults,
    features=frozenset({"lora", "cache", "negative_prompt", "cfg_limits"}),
    cfg=CfgRule(scale="guidance_scale", threshold=0.0, empty_negative=True, from_cond=True),
    timestep="reversed",
    variable_text=True,
    fp32_latents=True,
    sigma_linspace="torch",
)
