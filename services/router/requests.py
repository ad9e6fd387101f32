"""Request resolution (defaults from the model, checks against its spec) and result types.

CPU bookkeeping only: nothing here touches a device or a stage."""

from __future__ import annotations

import hashlib
import io
import secrets
from dataclasses import dataclass, field

import numpy as np

from services.runtime.cache_policy import CachePolicy
from services.runtime.config import MAX_FRAMES, GenerateRequest
from services.runtime.device import StageMeasurement
from services.runtime.errors import InvalidRequestError
from services.runtime.messages import AdapterRef, CacheStats
from services.runtime.registry import ModelDir
from services.runtime.spec import PipelineSpec

MAX_INPUT_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every default filled in from the model and every check passed."""

    prompt: str
    negative_prompt: str | None
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    max_sequence_length: int
    seeds: tuple[int, ...]
    output_format: str
    # Checked adapters (router/loras.py), applied to every image of the request.
    loras: tuple[AdapterRef, ...] = ()
    # The DiT cache policy (the request's or the server's); None: no caching.
    cache: CachePolicy | None = None
    num_frames: int = 0  # > 0: a video clip of this many frames
    fps: int = 0
    # Decoded input images (uint8 [H, W, 3]) and mask (uint8 [H, W]); a digest keys batching.
    images: tuple[np.ndarray, ...] = ()
    mask: np.ndarray | None = None
    inputs_digest: str = ""
    # Classifier-free guidance runs: the negative prompt is encoded and denoised too (the
    # family's rule, PipelineSpec.cfg; the negative prompt is set whenever it runs).
    cfg: bool = False
    cfg_normalization: float = 0.0  # ZImagePipeline's CFG limits (the "cfg_limits" feature)
    cfg_truncation: float = 1.0
    guidance_scale_2: float | None = None  # a two-expert model's low-noise CFG scale

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one denoiser batch."""
        return (
            self.height,
            self.width,
            self.num_inference_steps,
            self.guidance_scale,
            self.true_cfg_scale if self.cfg else None,
            (self.cfg_normalization, self.cfg_truncation) if self.cfg else None,
            self.guidance_scale_2,
            self.negative_prompt is not None,
            self.num_frames,
            self.fps,
            self.inputs_digest,  # one batch shares its input images
            self.max_sequence_length,
            # A batch shares its caching decisions (services/denoiser/cache.py): one policy each.
            self.cache.key() if self.cache is not None else None,
        )


@dataclass
class GeneratedImage:
    pixels: np.ndarray  # uint8 [H, W, 3]
    seed: int


@dataclass
class GenerateResult:
    request: ResolvedRequest
    images: list[GeneratedImage]
    stages: dict[str, StageMeasurement] = field(default_factory=dict)
    total_seconds: float = 0.0
    batch_size: int = 1  # images in the denoiser batch this request rode in
    cache_stats: CacheStats | None = None  # denoiser steps computed / taken from the DiT cache


def resolve_request(
    req: GenerateRequest, model: ModelDir, spec: PipelineSpec, default_cache: CachePolicy | None = None
) -> ResolvedRequest:
    defaults = spec.defaults(model)
    images, mask = _input_images(req, spec)
    default_height, default_width = defaults.height, defaults.width
    rule = spec.image_conditioning
    if rule is not None and rule.size_from is not None and images:  # an edit model: the image's aspect ratio
        h, w = images[rule.size_from].shape[:2]
        default_width, default_height = rule.vae_size(w, h)
    height = req.height if req.height is not None else default_height
    width = req.width if req.width is not None else default_width
    multiple = spec.size_multiple(model)
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise InvalidRequestError(f"{name} {value} is not a multiple of {multiple}", name)
    max_seq = req.max_sequence_length if req.max_sequence_length is not None else defaults.max_sequence_length
    limit = min(spec.max_sequence_length_limit, defaults.text_limit or spec.max_sequence_length_limit)
    if max_seq > limit:
        raise InvalidRequestError(
            f"max_sequence_length {max_seq} exceeds {limit} for {spec.family}",
            "max_sequence_length",
        )
    for feature, asked in (("lora", bool(req.lora)), ("cache", req.cache is not None and req.cache.enabled),
                           ("negative_prompt", req.negative_prompt is not None)):
        if asked and feature not in spec.features:
            raise InvalidRequestError(f"{feature} is not available for {spec.family}", feature)
    for name in ("cfg_normalization", "cfg_truncation"):  # the "cfg_limits" feature (ZImagePipeline's)
        if getattr(req, name) is not None and "cfg_limits" not in spec.features:
            raise InvalidRequestError(f"{name} is not available for {spec.family}", name)
    two_experts = model.index.get("boundary_ratio") is not None  # Wan 2.2 A14B
    if req.guidance_scale_2 is not None and not two_experts:
        raise InvalidRequestError(f"guidance_scale_2: {spec.family} has one expert (no boundary_ratio); it is the "
                                  "low-noise expert's CFG scale of two-expert models (Wan 2.2 A14B)", "guidance_scale_2")
    if "cache" not in spec.features:
        default_cache = None  # the server's default policy applies where caching exists
    guidance_scale = req.guidance_scale if req.guidance_scale is not None else defaults.guidance_scale
    true_cfg_scale = req.true_cfg_scale if req.true_cfg_scale is not None else defaults.true_cfg_scale
    rule, negative_prompt = spec.cfg, req.negative_prompt
    if rule.scale == "guidance_scale" and req.true_cfg_scale is not None:
        raise InvalidRequestError(f"true_cfg_scale: {spec.family}'s CFG scale is guidance_scale", "true_cfg_scale")
    scale = guidance_scale if rule.scale == "guidance_scale" else true_cfg_scale
    cfg = (negative_prompt is not None or rule.empty_negative) and scale > rule.threshold and not rule.disabled(model)
    if cfg and negative_prompt is None:
        negative_prompt = ""
    seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    num_frames, fps = _frames(req, spec, defaults)
    return ResolvedRequest(
        prompt=req.prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_inference_steps=req.num_inference_steps or defaults.num_inference_steps,
        guidance_scale=guidance_scale,
        true_cfg_scale=true_cfg_scale,
        max_sequence_length=max_seq,
        # Image i of a request uses seed + i, so each image is reproducible on its own.
        seeds=tuple(seed + i for i in range(req.n)),
        output_format=req.output_format,
        cache=_cache_policy(req.cache if req.cache is not None else default_cache),
        num_frames=num_frames,
        fps=fps,
        images=images,
        mask=mask,
        inputs_digest=_digest(req),
        cfg=cfg,
        cfg_normalization=req.cfg_normalization if req.cfg_normalization is not None else defaults.cfg_normalization,
        cfg_truncation=req.cfg_truncation if req.cfg_truncation is not None else defaults.cfg_truncation,
        guidance_scale_2=req.guidance_scale_2 if req.guidance_scale_2 is not None else (
            guidance_scale if two_experts else None),
    )


def _digest(req: GenerateRequest) -> str:
    """Equal only for the same input files in the same roles (lengths included, so [A, B] and
    [A + B] differ): the batch key, since a batch shares one set of inputs."""
    if not req.images and req.mask is None:
        return ""
    h = hashlib.sha1()
    for data in [*req.images, b"mask", req.mask or b""]:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _input_images(req: GenerateRequest, spec: PipelineSpec) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
    for name, given, feature in (("image", bool(req.images), "image"), ("mask", req.mask is not None, "mask")):
        if given and feature not in spec.features:
            raise InvalidRequestError(f"{name}: {spec.family} takes no input {name}", name)
        if not given and f"{feature}_required" in spec.features:
            raise InvalidRequestError(f"{name}: {spec.family} needs an input {name}", name)
    if len(req.images) > 1 and "images" not in spec.features:
        raise InvalidRequestError(f"image: {spec.family} takes one input image, got {len(req.images)}", "image")
    images = tuple(_decode(data, "image") for data in req.images)
    mask = _decode(req.mask, "mask") if req.mask is not None else None
    return images, mask


def _decode(data: bytes, param: str) -> np.ndarray:
    """An image file -> uint8 [H, W, 3]; a mask -> uint8 [H, W], white where to repaint. A mask
    with transparency follows OpenAI's convention (transparent = edit) and becomes 255 - alpha;
    an opaque one is read as grey levels, diffusers' convention."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_INPUT_PIXELS:  # from the header, before decoding
                raise InvalidRequestError(f"{param}: {image.width}x{image.height} is larger than the "
                                          f"{MAX_INPUT_PIXELS} pixels an input image may have", param)
            image.load()
            if param == "image":
                return np.asarray(image.convert("RGB"))
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                return 255 - np.asarray(image.convert("RGBA"))[..., 3]
            return np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InvalidRequestError(f"{param}: not an image this server can read (PNG, JPEG, WebP, ...)", param) from None


def _frames(req: GenerateRequest, spec: PipelineSpec, defaults) -> tuple[int, int]:
    """(num_frames, fps) of a video model's request, (0, 0) for an image model."""
    if "video" not in spec.features:
        for name in ("num_frames", "fps", "seconds"):
            if getattr(req, name) is not None:
                raise InvalidRequestError(f"{name}: {spec.family} makes images, not video", name)
        return 0, 0
    m, fps = spec.frame_multiple, req.fps if req.fps is not None else defaults.fps
    n = req.num_frames if req.num_frames is not None else defaults.num_frames
    if req.num_frames is None and req.seconds is not None:  # the nearest clip length the VAE takes
        n = 1 + m * max(round((req.seconds * fps - 1) / m), 0)
        if n > MAX_FRAMES:
            raise InvalidRequestError(f"seconds {req.seconds:g} at {fps} fps is {n} frames, more than {MAX_FRAMES}",
                                      "seconds")
    if (n - 1) % m:
        lower = n - (n - 1) % m
        valid = f"{lower} or {lower + m}" if lower >= 1 else f"{lower + m}"
        raise InvalidRequestError(
            f"num_frames {n} does not fit {spec.family}'s VAE, which folds {m} frames into one: use 1 + {m}k "
            f"frames (e.g. {valid})", "num_frames")
    return n, fps


def _cache_policy(policy: CachePolicy | None) -> CachePolicy | None:
    return policy if policy is not None and policy.enabled else None
