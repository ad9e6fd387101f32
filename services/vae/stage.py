"""The VAE stage: `decode(DecodeRequest) -> DecodeResponse`, one object per worker.

Decoding undoes the checkpoint's latent normalisation, runs the diffusers VAE, and quantises to uint8 on the worker, exactly as diffusers'
VaeImageProcessor does (x/2 + 0.5, clamp, *255, round), so 1 byte per channel crosses the wire
instead of 4.

Two normalisations, as the pipelines apply them: AutoencoderKL's scaling_factor / shift_factor
(Flux), and the per-channel latents_mean / latents_std of the video-shaped VAEs (Qwen-Image's,
Wan's), which decode [B, C, frames, h, w]; an image is their one-frame clip."""

from __future__ import annotations

import logging
import time

import torch

from services.runtime.components import load_component
from services.runtime.config import StageConfig, VaeConfig, warmup_size
from services.runtime.device import default_dtype, measure, parse_device, parse_dtype
from services.runtime.errors import UnsupportedModelError
from services.runtime.messages import DecodeRequest, DecodeResponse
from services.runtime.registry import resolve

log = logging.getLogger(__name__)


class VaeStage:
    def __init__(self, config: StageConfig):
        self.model, self.spec = resolve(config.model_path, config.backend)
        if self.spec.whole_pipeline:
            raise UnsupportedModelError(f"{self.spec.family} runs whole in the denoiser worker: it has no VAE worker")
        self.device = parse_device(config.device)
        self.dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(self.device)
        (name,) = self.spec.vae_components
        self.vae = load_component(self.model, name, dtype=self.dtype, device=self.device)
        vae_config = self.vae.config
        self.per_channel = getattr(vae_config, "latents_mean", None) is not None
        if self.per_channel:
            # Shaped [1, C, 1, 1, 1] for the 5-D latents; the pipeline divides by 1 / std.
            self.latents_mean = torch.tensor(vae_config.latents_mean).view(1, -1, 1, 1, 1)
            self.latents_std = torch.tensor(vae_config.latents_std).view(1, -1, 1, 1, 1)
        else:
            self.scaling_factor = vae_config.scaling_factor
            self.shift_factor = vae_config.shift_factor or 0.0
        if isinstance(config, VaeConfig):
            self.warm_up(config.warmup_resolutions)

    def warm_up(self, sizes: list[str]) -> None:
        """Decode zeros once per "WIDTHxHEIGHT" size before taking requests: the first decode of
        a size is where cuDNN picks its convolution algorithms and the allocator grows."""
        factor = self.model.vae_scale_factor
        for size in sizes:
            height, width = warmup_size(size, factor)
            t0 = time.perf_counter()
            channels = self.vae.config.z_dim if self.per_channel else self.vae.config.latent_channels
            latents = torch.zeros(1, channels, height // factor, width // factor)
            self.decode(DecodeRequest(latents=latents))
            log.info("VAE warm-up %s: %.2fs", size, time.perf_counter() - t0)

    @torch.inference_mode()
    def decode(self, request: DecodeRequest) -> DecodeResponse:
        with measure(self.device) as metrics:
            latents = request.latents.to(self.device, self.dtype)
            if self.per_channel:  # QwenImagePipeline's arithmetic, op for op
                mean = self.latents_mean.to(self.device, self.dtype)
                inv_std = 1.0 / self.latents_std.to(self.device, self.dtype)
                image = self.vae.decode(latents[:, :, None] / inv_std + mean, return_dict=False)[0][:, :, 0]
            else:
                latents = latents / self.scaling_factor + self.shift_factor
                image = self.vae.decode(latents, return_dict=False)[0]
            image = (image * 0.5 + 0.5).clamp(0, 1)
            image = image.cpu().permute(0, 2, 3, 1).float()
            images = (image * 255).round().to(torch.uint8)
        return DecodeResponse(images=images, metrics=metrics)
