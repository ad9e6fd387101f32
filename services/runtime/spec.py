"""Pipeline specs: the declarative description of one model family's serving layout.

A spec says which checkpoint components each stage loads, which prompt encoder and native DiT
serve the family, how latents are laid out, and the family's generation defaults. The router,
the stages and the CLI read specs; nothing else switches on a model name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from services.runtime.registry import ModelDir


@dataclass(frozen=True)
class GenerationDefaults:
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    max_sequence_length: int
    true_cfg_scale: float = 1.0  # real CFG against a negative prompt applies when > 1
    # ZImagePipeline's cfg_normalization and cfg_truncation (the request fields' defaults, for
    # specs with the "cfg_limits" feature): cap the guided
    # velocity's norm, per image, at this times the conditional one's (0: off); run no CFG on
    # steps whose (1000 - t) / 1000 exceeds cfg_truncation (1: never skipped).
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    num_frames: int = 0  # > 0: a video model's default clip length
    fps: int = 0
    # This checkpoint's own cap on text tokens where it is below the family's
    # max_sequence_length_limit (Z-Image: its RoPE table's length); None: the family's.
    text_limit: int | None = None


@dataclass(frozen=True)
class CfgRule:
    """Classifier-free guidance as the family's pipeline runs it: the router reads when a request
    has a negative branch, the sampling loop how the two velocities combine.

    The default is true CFG (FluxPipeline, QwenImagePipeline): it runs with a negative prompt and
    true_cfg_scale > 1, guided = uncond + s (cond - uncond). Pipelines whose CFG scale is
    guidance_scale encode "" when no negative prompt is given (ZImagePipeline from a scale > 0,
    with guided = cond + s (cond - uncond); WanPipeline and Flux2KleinPipeline from > 1)."""

    scale: str = "true_cfg_scale"  # the request field that is the CFG scale
    threshold: float = 1.0  # CFG runs when that scale exceeds this
    empty_negative: bool = False  # without a negative prompt, CFG runs against ""
    from_cond: bool = False  # guided = cond + s (cond - uncond)
    renorm: bool = False  # rescale the guided velocity to the conditional one's norm, per token (Qwen-Image)
    # A flag of the pipeline's own config (model_index.json) under which no CFG runs whatever the
    # scale: Flux2KleinPipeline's is_distilled (its step-distilled checkpoints ignore the scale).
    disabled_by: str = ""

    def disabled(self, model: "ModelDir") -> bool:
        return bool(self.disabled_by) and bool(model.index.get(self.disabled_by))


def calculate_dimensions(area: int, width: int, height: int, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about `area` pixels with the aspect ratio of width x height, each
    rounded to a multiple of `multiple`: the Qwen-Image-Edit pipelines' calculate_dimensions,
    float for float (Python rounds halves to even, as there)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return round(w / multiple) * multiple, round(h / multiple) * multiple


@dataclass(frozen=True)
class ImageConditioning:
    """Input images that the VAE stage encodes and the DiT is conditioned on. Two schemes:

    - "tokens" (QwenImageEditPipeline, QwenImageEditPlusPipeline): each image, resized to about
      `vae_area` pixels in its own aspect ratio, becomes normalised latents whose packed tokens
      the DiT attends to after the noise tokens (each image its own RoPE frame); the output
      keeps only the noise tokens. The output's default size is image `size_from`'s at `vae_area`.
    - "first_frame" (WanImageToVideoPipeline): the image, resized to the requested size, is the
      first frame of an otherwise black clip of the requested length; its normalised latents
      and a mask of the first latent frame join the noise as extra input channels."""

    mode: str = "tokens"
    vae_area: int = 1024 * 1024
    size_from: int | None = 0  # None: the output size defaults to the model's, not an image's

    def __post_init__(self):
        if self.mode not in ("tokens", "first_frame"):
            raise ValueError(f"image conditioning mode {self.mode!r} is not one of tokens, first_frame")

    def vae_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the VAE stage encodes an input image of this size at ("tokens")."""
        return calculate_dimensions(self.vae_area, width, height)


@dataclass(frozen=True)
class PipelineSpec:
    family: str
    # `_class_name` values in model_index.json that this spec serves.
    pipeline_classes: tuple[str, ...]
    # Prompt-encoder kind; the encoder stage maps it to an implementation.
    prompt_encoder: str
    encoder_components: tuple[str, ...]
    # Native DiT family; the denoiser stage maps it to a model file and latent layout.
    denoiser: str
    denoiser_components: tuple[str, ...]
    vae_components: tuple[str, ...]
    # Latents are patchified p x p before the DiT, so pixel sizes must be multiples of
    # vae_scale_factor * latent_patch.
    latent_patch: int
    max_sequence_length_limit: int
    defaults: Callable[["ModelDir"], GenerationDefaults]
    # The workers a request goes through, in order. ("denoiser",): the denoiser worker runs the
    # whole pipeline (the diffusers backend) and returns pixels.
    stages: tuple[str, ...] = ("encoder", "denoiser", "vae")
    # Per-request options the family serves; a request that asks for another gets a 400.
    # ("cfg_limits": the request fields cfg_normalization / cfg_truncation, ZImagePipeline's.)
    features: frozenset[str] = frozenset({"lora", "cache", "negative_prompt"})
    # Video: the VAE compresses time by this factor, so clips have 1 + k * frame_multiple frames.
    frame_multiple: int = 1
    # When a request runs classifier-free guidance and how the branches combine (CfgRule).
    cfg: CfgRule = field(default_factory=lambda: CfgRule())
    # What the DiT is conditioned on, from the scheduler's t (0..1000): "fraction" t / 1000 (Flux,
    # Qwen-Image); "reversed" (1000 - t) / 1000, 0 at pure noise, and the DiT predicts the negated
    # velocity (ZImagePipeline); "raw" t itself (WanPipeline).
    timestep: str = "fraction"
    # Noise, CFG and the Euler steps stay fp32 whatever the DiT's dtype (ZImagePipeline); else
    # they run in the DiT's dtype, as Flux's and Qwen-Image's pipelines do.
    fp32_latents: bool = False
    # The DiT sees each prompt's own token count (Qwen-Image, Z-Image), not a fixed padded length:
    # compiled blocks then take the text length as a dynamic shape (services/denoiser/compile.py).
    variable_text: bool = False
    # With fp32_latents: the branches' predictions stay in the DiT's dtype, CFG combines them
    # there and a FlowMatch Euler step rounds the latents back to it (WanPipeline: only its
    # noise is drawn in fp32); else they are cast to the latents' dtype first (ZImagePipeline).
    guidance_in_dit_dtype: bool = False
    # The default sigma grid linspace(1, 1/n, n): "numpy" (FluxPipeline's, float64) or "torch"
    # (ZImagePipeline's, float32; for most n they differ in the last bit), with the resolution
    # shift mu; or "scheduler": the scheduler's own grid from set_timesteps(n) (WanPipeline).
    sigma_linspace: str = "numpy"
    # The resolution shift mu where the scheduler config sets use_dynamic_shifting:
    # "calculate_shift" (Flux.1's, Qwen-Image's, Z-Image's: linear in image_seq_len between the
    # config's base and max) or "compute_empirical_mu" (Flux.2's pipelines: a fit in image_seq_len
    # and the step count; services/denoiser/schedule.py).
    mu: str = "calculate_shift"
    # Input images encoded by the VAE stage and attended to by the DiT (image editing); None: the
    # family takes no such images.
    image_conditioning: ImageConditioning | None = None

    # A reason this spec cannot serve a directory of its pipeline class (a variant the native
    # family lacks), or None; `--backend auto` then serves it through the diffusers backend.
    unserved: Callable[["ModelDir"], str | None] = lambda model: None

    def __post_init__(self):
        # The string-valued choices, checked when a spec is defined (import time), not mid-request.
        for name, value, allowed in (("timestep", self.timestep, ("fraction", "reversed", "raw")),
                                     ("sigma_linspace", self.sigma_linspace, ("numpy", "torch", "scheduler")),
                                     ("mu", self.mu, ("calculate_shift", "compute_empirical_mu")),
                                     ("cfg.scale", self.cfg.scale, ("true_cfg_scale", "guidance_scale"))):
            if value not in allowed:
                raise ValueError(f"{self.family} spec: {name} {value!r} is not one of {', '.join(allowed)}")

    def size_multiple(self, model: "ModelDir") -> int:
        return model.vae_scale_factor * self.latent_patch

    @property
    def whole_pipeline(self) -> bool:
        return self.stages == ("denoiser",)
