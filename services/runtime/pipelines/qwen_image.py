"""Qwen-Image (and Qwen-Image-2512, the same layout): a Qwen2.5-VL prompt encoder, the Qwen-Image
MMDiT, and Qwen-Image's own (video-shaped, one-frame) VAE. Qwen-Image-Edit and Edit-Plus (2509)
add image conditioning: the encoder also sees the input images through Qwen2.5-VL's vision tower,
and the VAE stage encodes them to latents the DiT attends to (spec.ImageConditioning)."""

from __future__ import annotations

import dataclasses

from services.runtime.spec import CfgRule, GenerationDefaults, ImageConditioning, PipelineSpec

# Transformer options of later checkpoints that the native DiT does not implement (Qwen-Image-Layered's
# extra timestep and 3-D RoPE, a guidance-distilled variant). Qwen-Image-Edit-2511's zero_cond_t is served.
_UNSERVED_OPTIONS = ("use_additional_t_cond", "use_layer3d_rope", "guidance_embeds")


def _qwen_image_defaults(model) -> GenerationDefaults:
    # QwenImagePipeline.__call__'s defaults: 50 steps, true CFG 4.0 (applied when a negative
    # prompt is given), 128 x the VAE's downsampling (1024 for Qwen-Image), 512 text tokens.
    # guidance_scale only feeds guidance-distilled checkpoints, which are not served natively.
    size = 128 * model.vae_scale_factor
    return GenerationDefaults(50, 1.0, size, size, 512, true_cfg_scale=4.0)


def _unserved(model) -> str | None:
    config = model.component_config("transformer")
    options = [o for o in _UNSERVED_OPTIONS if config.get(o)]
    return f"the transformer option(s) {', '.join(options)}" if options else None


def _unserved_edit(model) -> str | None:
    if not model.has_component("processor"):
        return "a pipeline without its processor (the vision encoder's image preprocessing)"
    return _unserved(model)


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
    unserved=_unserved,
)

# QwenImageEditPipeline: one input image; the output's default size is that image's aspect
# ratio at about 1024x1024. Its prompt encoding runs no max_sequence_length cut (the pipeline
# takes the argument and ignores it), and neither does this one.
QWEN_IMAGE_EDIT = PipelineSpec(
    family="qwen_image_edit",
    pipeline_classes=("QwenImageEditPipeline",),
    prompt_encoder="qwen_vl_edit",
    encoder_components=("processor", "text_encoder"),
    denoiser="qwen_image",
    denoiser_components=("transformer", "scheduler"),
    vae_components=("vae",),
    latent_patch=2,
    max_sequence_length_limit=1024,
    defaults=_qwen_image_defaults,
    features=frozenset({"lora", "cache", "negative_prompt", "image", "image_required"}),
    cfg=CfgRule(renorm=True),
    variable_text=True,
    image_conditioning=ImageConditioning(size_from=0),
    unserved=_unserved_edit,
)

# QwenImageEditPlusPipeline (Qwen-Image-Edit-2509, and 2511 whose DiT has zero_cond_t): one or
# more input images, each shown to the vision encoder at about 384x384 and encoded by the VAE
# at about 1024x1024; the default output size follows the last one.
QWEN_IMAGE_EDIT_PLUS = dataclasses.replace(
    QWEN_IMAGE_EDIT,
    family="qwen_image_edit_plus",
    pipeline_classes=("QwenImageEditPlusPipeline",),
    prompt_encoder="qwen_vl_edit_plus",
    features=QWEN_IMAGE_EDIT.features | {"images"},
    image_conditioning=ImageConditioning(size_from=-1),
)
