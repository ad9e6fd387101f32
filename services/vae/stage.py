"""The VAE stage: `decode(DecodeRequest) -> DecodeResponse`, one object per worker.

Decoding undoes the checkpoint's latent normalisation (scaling_factor, shift_factor), runs
the diffusers AutoencoderKL, and quantises to uint8 on the worker, exactly as diffusers'
VaeImageProcessor does (x/2 + 0.5, clamp, *255, round), so 1 byte per channel crosses the wire
instead of 4."""

from __future__ import annotations

import torch

from services.runtime.components import load_component
from services.runtime.config import StageConfig
from services.runtime.device import default_dtype, measure, parse_device, parse_dtype
from services.runtime.messages import DecodeRequest, DecodeResponse
from services.runtime.registry import resolve


class VaeStage:
    def __init__(self, config: StageConfig):
        self.model, self.spec = resolve(config.model_path)
        self.device = parse_device(config.device)
        self.dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(self.device)
        (name,) = self.spec.vae_components
        self.vae = load_component(self.model, name, dtype=self.dtype, device=self.device)
        self.scaling_factor = self.vae.config.scaling_factor
        self.shift_factor = self.vae.config.shift_factor or 0.0

    @torch.inference_mode()
    def decode(self, request: DecodeRequest) -> DecodeResponse:
        with measure(self.device) as metrics:
            latents = request.latents.to(self.device, self.dtype)
            latents = latents / self.scaling_factor + self.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = (image * 0.5 + 0.5).clamp(0, 1)
            image = image.cpu().permute(0, 2, 3, 1).float()
            images = (image * 255).round().to(torch.uint8)
        return DecodeResponse(images=images, metrics=metrics)
