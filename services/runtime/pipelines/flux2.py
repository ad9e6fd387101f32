"""Flux.2 [klein] (Flux2KleinPipeline: the 4B / 9B models, distilled or base): a Qwen3 prompt
encoder (three of its layers per token), the Flux.2 DiT, and Flux.2's batch-norm VAE.

Flux.2 [dev] (Flux2Pipeline): the same DiT (with a guidance embedding: guidance-distilled, no CFG)
and VAE, and a Mistral Small 3 prompt encoder (three of its layers per token). Reference images
(editing) of either pipeline are served by --backend diffusers only."""

from __future__ import annotations

import dataclasses

from services.runtime.spec import CfgRule, GenerationDefaults, PipelineSpec


def _klein_defaults(model) -> GenerationDefaults:
    # Flux2KleinPipeline.__call__'s defaults: 50 steps, guidance 4.0 (CFG against ""), 128 x the
    # VAE's downsampling (1024), 512 text tokens. The step-distilled checkpoints (is_distilled)
    # ignore the guidance scale and are meant for 4 steps: their model cards' 4 steps and 1.0,
    # as flux.py takes schnell's numbers from its card rather than FluxPipeline's.
    size = 128 * model.vae_scale_factor
    if model.index.get("is_distilled"):
        return GenerationDefaults(4, 1.0, size, size, 512)
    return GenerationDefaults(50, 4.0, size, size, 512)


FLUX2_KLEIN = PipelineSpec(
    family="flux2_klein",
    pipeline_classes=("Flux2KleinPipeline",),
    prompt_encoder="qwen3_flux2_klein",
    encoder_components=("tokenizer", "text_encoder"),
    denoiser="flux2",
    denoiser_components=("transformer", "scheduler"),
    vae_components=("vae",),
    latent_patch=2,
    max_sequence_length_limit=512,  # the pipeline's tokenizer_max_length
    defaults=_klein_defaults,
    # The pipeline takes no negative prompt (its CFG is always against ""). Reference images
    # (editing) are served by --backend diffusers only.
    features=frozenset({"lora", "cache"}),
    cfg=CfgRule(scale="guidance_scale", threshold=1.0, empty_negative=True, disabled_by="is_distilled"),
    mu="compute_empirical_mu",
)


def _dev_defaults(model) -> GenerationDefaults:
    # Flux2Pipeline.__call__'s: 50 steps, guidance 4.0 (embedded: the model is guidance-distilled),
    # 128 x the VAE's downsampling (1024), 512 text tokens.
    size = 128 * model.vae_scale_factor
    return GenerationDefaults(50, 4.0, size, size, 512)


FLUX2_DEV = dataclasses.replace(
    FLUX2_KLEIN,
    family="flux2_dev",
    pipeline_classes=("Flux2Pipeline",),
    prompt_encoder="mistral3_flux2",
    defaults=_dev_defaults,
    # No negative prompt and no CFG: guidance_scale goes into the DiT's guidance embedding.
    cfg=CfgRule(scale="guidance_scale", threshold=float("inf")),
)
