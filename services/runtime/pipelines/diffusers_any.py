"""The diffusers backend's spec: any diffusers pipeline that no native family serves.

The whole pipeline runs in one denoiser worker (services/denoiser/diffusers_backend.py): no
encoder or VAE worker, no sequence parallelism, no per-request LoRA or DiT cache. The spec is
built per model directory, since the defaults come from that pipeline: its own `__call__`
defaults for steps, guidance and text length, and its DiT's sample_size x the VAE's scale
factor for the size (what the pipeline itself uses when height / width are not given)."""

from __future__ import annotations

import inspect
import re

from services.runtime.spec import GenerationDefaults, PipelineSpec

# The DiT / UNet component of a diffusers pipeline, by the names pipelines use.
DENOISER_COMPONENTS = ("transformer", "unet", "prior")
# Text length when the pipeline has no max_sequence_length argument (CLIP's 77 tokens).
CLIP_LENGTH = 77
# Frame rate of the MP4s of video pipelines (diffusers' pipelines leave it to export_to_video;
# 16 is what Wan's examples use).
VIDEO_FPS = 16


def pipeline_class(name: str):
    """The diffusers pipeline class called `name`, or None (diffusers imports it lazily)."""
    if not name.endswith("Pipeline"):
        return None
    import diffusers

    cls = getattr(diffusers, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline) else None


def diffusers_spec(model) -> PipelineSpec | None:
    cls = pipeline_class(model.pipeline_class)
    if cls is None:
        return None
    _check_components(model, cls)
    params = inspect.signature(cls.__call__).parameters
    denoiser = next((c for c in DENOISER_COMPONENTS if c in model.index), None)
    config = model.component_config(denoiser) if denoiser else {}
    patch = config.get("patch_size") or (config.get("all_patch_size") or [1])[0]  # Z-Image: all_patch_size
    patch = patch if isinstance(patch, int) else max(patch[-2:])  # video DiTs: (t, h, w)
    patch = _latent_patch(model, denoiser, patch)
    max_seq = _default(params, "max_sequence_length", CLIP_LENGTH)
    video = "num_frames" in params

    def defaults(model) -> GenerationDefaults:
        sample = config.get("sample_size")
        sample = sample if isinstance(sample, int) else (sample or [128])[-1]
        size = sample * model.vae_scale_factor
        return GenerationDefaults(
            num_inference_steps=_default(params, "num_inference_steps", 28),
            guidance_scale=float(_default(params, "guidance_scale", 5.0)),
            true_cfg_scale=float(_default(params, "true_cfg_scale", 1.0)),
            height=_default(params, "height", size), width=_default(params, "width", size), max_sequence_length=max_seq,
            num_frames=_default(params, "num_frames", 49) if video else 0, fps=VIDEO_FPS if video else 0,
        )

    return PipelineSpec(
        family=f"diffusers:{model.pipeline_class}",
        pipeline_classes=(model.pipeline_class,),
        prompt_encoder="",
        encoder_components=(),
        denoiser="diffusers",
        denoiser_components=tuple(k for k in model.index if not k.startswith("_")),
        vae_components=(),
        latent_patch=patch,
        # A request may ask for more text than the default only where the pipeline takes it.
        max_sequence_length_limit=max(max_seq, 512) if "max_sequence_length" in params else max_seq,
        defaults=defaults,
        stages=("denoiser",),
        features=frozenset({"negative_prompt"} & set(params) | ({"video"} if video else set())
                           | _image_features(cls, params)),
        frame_multiple=_temporal_factor(model) if video else 1,
    )


def _latent_patch(model, denoiser: str | None, patch: int) -> int:
    """Latents per side of one DiT token. DiT pipelines work on 2x2 latent patches even where
    the transformer's config says patch_size 1: Flux, Qwen-Image and Z-Image pack them in the
    pipeline, Flux.2 in its VAE (its own patch_size). A DC-AE (Sana: 32x, encoder_block_out_channels)
    is the exception whose DiT takes single latents; UNets take single latents too."""
    try:
        vae = model.component_config("vae")
    except Exception:
        vae = {}
    vae_patch = vae.get("patch_size") or 1
    vae_patch = vae_patch if isinstance(vae_patch, int) else max(vae_patch)
    if denoiser != "transformer" or "encoder_block_out_channels" in vae:
        return max(patch, vae_patch)
    return max(patch, vae_patch, 2)


def _image_features(cls, params) -> set[str]:
    """image / mask inputs the pipeline takes, and whether it cannot run without them (an edit,
    image-to-image or image-to-video pipeline; diffusers gives most of them a None default)."""
    out = set()
    needs_image = re.search(r"Edit|ImageToVideo|Img2Img|Inpaint|Fill", cls.__name__) is not None
    if "image" in params:
        out.add("image")
        if needs_image or params["image"].default is inspect.Parameter.empty:
            out.add("image_required")
        if "EditPlus" in cls.__name__:  # Qwen-Image-Edit-Plus conditions on several images
            out.add("images")
    if "mask_image" in params:
        out.add("mask")
        if re.search(r"Inpaint|Fill", cls.__name__):
            out.add("mask_required")
    return out


def _check_components(model, cls) -> None:
    """Fail at start, naming them, when the directory lacks components the class requires."""
    from services.runtime.errors import UnsupportedModelError

    required = [name for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    missing = [name for name in required if name not in model.index]
    if missing:
        raise UnsupportedModelError(f"{model.path}: {cls.__name__} needs components {', '.join(missing)}, which "
                                    "model_index.json does not name")


def _default(params, name: str, fallback):
    p = params.get(name)
    return p.default if p is not None and p.default not in (inspect.Parameter.empty, None) else fallback


def _temporal_factor(model) -> int:
    """How many frames a video VAE folds into one latent frame (from its config, as the
    pipelines compute it): Wan's temperal_downsample flags, LTX's temporal_compression_ratio."""
    try:
        config = model.component_config("vae")
    except Exception:
        return 1
    if "temperal_downsample" in config:  # diffusers' spelling, Wan
        return 2 ** sum(bool(x) for x in config["temperal_downsample"])
    return int(config.get("temporal_compression_ratio") or config.get("scale_factor_temporal") or 1)
