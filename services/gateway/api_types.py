"""The OpenAI-style REST request and response bodies (pydantic), and their mapping to GenerateRequest."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.runtime.cache_policy import CachePolicy
from services.runtime.config import MAX_IMAGES_PER_REQUEST, MAX_LORAS_PER_REQUEST, GenerateRequest, LoraRef
from services.runtime.errors import InvalidRequestError

_SIZE = re.compile(r"^(\d+)x(\d+)$")


class ImageGenerationBody(BaseModel):
    """POST /v1/images/generations: OpenAI's fields plus ditserve's extensions at the top level."""

    model_config = ConfigDict(extra="forbid")

    # OpenAI fields
    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    size: str | None = Field(None, description='"WxH" or "auto" (the model default)')
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    user: str | None = None
    # ditserve extensions
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    cfg_normalization: float | None = None
    cfg_truncation: float | None = None
    max_sequence_length: int | None = None
    timeout_s: float | None = Field(None, gt=0, description="per-request deadline")
    lora: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS_PER_REQUEST)
    cache: CachePolicy | None = None

    def to_generate_request(self, images: list[bytes] = (), mask: bytes | None = None) -> GenerateRequest:
        """`images` / `mask`: the files of an edit (POST /v1/images/edits), validated with the rest."""
        width, height = _parse_size(self.size)
        return GenerateRequest.parse(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            true_cfg_scale=self.true_cfg_scale,
            cfg_normalization=self.cfg_normalization,
            cfg_truncation=self.cfg_truncation,
            seed=self.seed,
            n=self.n,
            max_sequence_length=self.max_sequence_length,
            output_format=self.output_format,
            lora=self.lora,
            cache=self.cache,
            images=list(images),
            mask=mask,
        )


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "auto"):
        return None, None
    m = _SIZE.match(size)
    if not m:
        raise InvalidRequestError(f"size must be 'WIDTHxHEIGHT' or 'auto', got '{size}'", "size")
    return int(m.group(1)), int(m.group(2))


class VideoBody(BaseModel):
    """POST /v1/videos (JSON, or multipart as the openai client sends it): OpenAI's fields plus
    ditserve's extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    seconds: float | None = None
    size: str | None = None
    # ditserve extensions
    num_frames: int | None = None
    fps: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None  # two-expert models (Wan 2.2 A14B): the low-noise steps' scale
    negative_prompt: str | None = None
    seed: int | None = None

    def to_generate_request(self, images: list[bytes] = ()) -> GenerateRequest:
        width, height = _parse_size(self.size)
        return GenerateRequest.parse(
            prompt=self.prompt, negative_prompt=self.negative_prompt, width=width, height=height,
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            guidance_scale_2=self.guidance_scale_2, seed=self.seed, num_frames=self.num_frames, fps=self.fps,
            seconds=self.seconds, images=list(images),
        )


class SetLoraBody(BaseModel):
    """POST /v1/set_lora (SGLang-Diffusion's fields)."""

    model_config = ConfigDict(extra="forbid")

    lora_nickname: str = Field(min_length=1, max_length=128)
    lora_path: str | None = None
    strength: float | None = Field(None, ge=-10.0, le=10.0)
    target: str | None = None
