"""Qwen-Image (and Qwen-Image-2512, the same layout): a Qwen2.5-VL prompt encoder, the Qwen-Image
MMDiT, and Qwen-Image's own (video-shaped, one-frame) VAE."""

from __future__ import annotations

from services.runtime.spec import CfgRule, GenerationDefaults, PipelineSpec


def _qwen_image_defaults(model) -> GenerationDefaults:
    # QwenImagePipeline.__call__'s defaults: 50 steps, true CFG 4.0 (applied when a negative
    # prompt is given), 128 x the VAE's downsampling (1024 for Qwen-Image), 512 text tokens.
    # guidance_scale only feeds guidance-distilled checkpoints, which are not served natively.
    size = 128 * model.vae_scale_factor
    return GenerationDefaults(50, 1.0, size, size, 512, true_cfg_scale=4.0)


QWEN_IMAGE = PipelineSpec(
    family="qwen_image",
    pipeline_classes=("QwenImagePipeline",),
    prompt_encoder="qwen_vl",
    encoder_components=("tokenizer", "text_encoder"),
    denoiser="qwen_image",
    denoiser_components=("transformer", "scheduler"),
    vae_components=("vae",),
    latent_patch=2,
    max_sequence_length_limit=1024,  # the pipeline refuses more
    defaults=_qwen_image_defaults,
    cfg=CfgRule(renorm=True),
    variable_text=True,
)
