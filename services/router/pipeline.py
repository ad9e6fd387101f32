"""Request resolution and stage orchestration: encode -> denoise -> decode.

The router is the only place that knows the order of stages. It sees the model only through
its ModelDir / PipelineSpec (sizes, defaults) and the stages only through stage clients."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from services.runtime.config import GenerateRequest
from services.runtime.device import StageMeasurement
from services.runtime.errors import InvalidRequestError
from services.runtime.messages import Conditioning, DecodeRequest, DenoiseRequest, EncodeRequest
from services.runtime.registry import ModelDir
from services.runtime.spec import PipelineSpec
from services.runtime.stage_client import DenoiserClient, EncoderClient, StepCallback, VaeClient


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

    @property
    def true_cfg(self) -> bool:
        # diffusers' FluxPipeline rule: real CFG only with a negative prompt and a scale > 1.
        return self.negative_prompt is not None and self.true_cfg_scale > 1


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


def resolve_request(req: GenerateRequest, model: ModelDir, spec: PipelineSpec) -> ResolvedRequest:
    defaults = spec.defaults(model)
    height = req.height if req.height is not None else defaults.height
    width = req.width if req.width is not None else defaults.width
    multiple = spec.size_multiple(model)
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise InvalidRequestError(f"{name} {value} is not a multiple of {multiple}", name)
    max_seq = req.max_sequence_length if req.max_sequence_length is not None else defaults.max_sequence_length
    if max_seq > spec.max_sequence_length_limit:
        raise InvalidRequestError(
            f"max_sequence_length {max_seq} exceeds {spec.max_sequence_length_limit} for {spec.family}",
            "max_sequence_length",
        )
    seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    return ResolvedRequest(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        height=height,
        width=width,
        num_inference_steps=req.num_inference_steps or defaults.num_inference_steps,
        guidance_scale=req.guidance_scale if req.guidance_scale is not None else defaults.guidance_scale,
        true_cfg_scale=req.true_cfg_scale,
        max_sequence_length=max_seq,
        # Image i of a request uses seed + i, so each image is reproducible on its own.
        seeds=tuple(seed + i for i in range(req.n)),
        output_format=req.output_format,
    )


class Router:
    def __init__(
        self, model: ModelDir, spec: PipelineSpec, encoder: EncoderClient, denoiser: DenoiserClient, vae: VaeClient
    ):
        self.model, self.spec = model, spec
        self.encoder, self.denoiser, self.vae = encoder, denoiser, vae

    def generate(self, req: GenerateRequest, on_step: StepCallback | None = None) -> GenerateResult:
        t0 = time.perf_counter()
        r = resolve_request(req, self.model, self.spec)
        n = len(r.seeds)

        prompts = [r.prompt] + ([r.negative_prompt] if r.true_cfg else [])
        enc = self.encoder.encode(EncodeRequest(prompts=prompts, max_sequence_length=r.max_sequence_length))

        def branch(row: int) -> Conditioning:
            return Conditioning(
                prompt_embeds=enc.prompt_embeds[row : row + 1].repeat(n, 1, 1),
                pooled_prompt_embeds=enc.pooled_prompt_embeds[row : row + 1].repeat(n, 1),
            )

        den = self.denoiser.denoise(
            DenoiseRequest(
                positive=branch(0),
                negative=branch(1) if r.true_cfg else None,
                height=r.height,
                width=r.width,
                num_inference_steps=r.num_inference_steps,
                guidance_scale=r.guidance_scale,
                true_cfg_scale=r.true_cfg_scale,
                seeds=list(r.seeds),
            ),
            on_step=on_step,
        )
        dec = self.vae.decode(DecodeRequest(latents=den.latents))
        images = [GeneratedImage(pixels=dec.images[i].numpy(), seed=s) for i, s in enumerate(r.seeds)]
        return GenerateResult(
            request=r,
            images=images,
            stages={"encoder": enc.metrics, "denoiser": den.metrics, "vae": dec.metrics},
            total_seconds=time.perf_counter() - t0,
        )
