"""Flux.1 (dev, schnell and fine-tunes in the same layout)."""

from __future__ import annotations

from services.runtime.spec import GenerationDefaults, PipelineSpec


def _flux_defaults(model) -> GenerationDefaults:
    # dev is guidance-distilled (it has a guidance embedding); schnell is timestep-distilled.
    # The numbers are the ones each model card recommends; diffusers' FluxPipeline uses the dev
    # ones for both, which makes schnell needlessly slow.
    # Size: the VAE's sample_size (Flux.1's says 1024, the embedded 64x64 model's 64), else
    # diffusers' default_sample_size (128) x the VAE's downsampling. Text length: the model card's,
    # capped by the T5 tokenizer's own limit (32 for the embedded model: more would be padding).
    size = model.component_config("vae").get("sample_size") or 128 * model.vae_scale_factor
    t5_tokens = model.tokenizer_max_length("tokenizer_2") or 512
    if model.component_config("transformer").get("guidance_embeds", False):
        return GenerationDefaults(28, 3.5, size, size, min(512, t5_tokens))
    return GenerationDefaults(4, 0.0, size, size, min(256, t5_tokens))


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
