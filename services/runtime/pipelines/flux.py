"""Flux.1 (dev, schnell and fine-tunes in the same layout)."""

from __future__ import annotations

from services.runtime.spec import GenerationDefaults, PipelineSpec


def _flux_defaults(model) -> GenerationDefaults:
    # dev is guidance-distilled (it has a guidance embedding); schnell is timestep-distilled.
    # The numbers are the ones each model card recommends; diffusers' FluxPipeline uses the dev
    # ones for both, which makes schnell needlessly slow.
    # 1024 px = diffusers' default_sample_size (128) x the VAE's 8x downsampling.
    size = 128 * model.vae_scale_factor
    if model.component_config("transformer").get("guidance_embeds", False):
        return GenerationDefaults(28, 3.5, size, size, 512)
    return GenerationDefaults(4, 0.0, size, size, 256)


FLUX = PipelineSpec(
    family="flux",
    pipeline_classes=("FluxPipeline",),
    prompt_encoder="clip_t5",
    encoder_components=("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
    denoiser="flux",
    denoiser_components=("transformer", "scheduler"),
    vae_components=("vae",),
    latent_patch=2,
    max_sequence_length_limit=512,
    defaults=_flux_defaults,
)
