"""The VAE stage: `decode(DecodeRequest) -> DecodeResponse`, one object per worker.

Decoding undoes the checkpoint's latent normalisation, runs the diffusers VAE, and quantises to uint8 on the worker, exactly as diffusers'
VaeImageProcessor does (x/2 + 0.5, clamp, *255, round), so 1 byte per channel crosses the wire
instead of 4.

Two normalisations, as the pipelines apply them: AutoencoderKL's scaling_factor / shift_factor
(Flux), and the per-channel latents_mean / latents_std of the video-shaped VAEs (Qwen-Image's,
Wan's), which decode [B, C, frames, h, w]; an image is their one-frame clip.
Flux.2's AutoencoderKLFlux2 (batch_norm_eps in its config) takes its latents in 2x2 patches,
[B, 4C, h/2, w/2], normalised per patch channel by the VAE's batch-norm statistics: undone, then
unpatchified before decoding.

Encoding (spec.image_conditioning) turns input images into the latents the DiT is conditioned
on, as the pipelines prepare them: an edit pipeline's _encode_vae_image (each image resized by
diffusers' VaeImageProcessor, the distribution's mode, normalised per channel), or
WanImageToVideoPipeline's first-frame clip."""

from __future__ import annotations

import logging
import time

import torch

from services.runtime.components import load_component
from services.runtime.config import StageConfig, VaeConfig, warmup_size
from services.runtime.device import default_dtype, measure, parse_device, parse_dtype
from services.runtime.errors import InvalidRequestError, UnsupportedModelError
from services.runtime.messages import DecodeRequest, DecodeResponse, VaeEncodeRequest, VaeEncodeResponse
from services.runtime.registry import resolve

log = logging.getLogger(__name__)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, 4C, h, w] -> [B, C, 2h, 2w], channel c*4 + 2*dy + dx to pixel (2y + dy, 2x + dx): the
    Flux.2 pipelines' _unpatchify_latents, the inverse of models/flux2.py's patchify."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


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
        self.batch_norm = getattr(vae_config, "batch_norm_eps", None) is not None  # AutoencoderKLFlux2
        if self.per_channel:
            # Shaped [1, C, 1, 1, 1] for the 5-D latents; the pipeline divides by 1 / std.
            self.latents_mean = torch.tensor(vae_config.latents_mean).view(1, -1, 1, 1, 1)
            self.latents_std = torch.tensor(vae_config.latents_std).view(1, -1, 1, 1, 1)
        elif not self.batch_norm:  # (the batch-norm statistics are read at decode, as the pipeline does)
            self.scaling_factor = vae_config.scaling_factor
            self.shift_factor = vae_config.shift_factor or 0.0
        self.image_processor = None
        if self.spec.image_conditioning is not None:
            if not self.per_channel:
                raise UnsupportedModelError(f"{self.spec.family}: encoding input images is implemented for "
                                            "per-channel normalised VAEs (Qwen-Image's) only")
            from diffusers.image_processor import VaeImageProcessor

            # The pipelines' own processor (an edit pipeline's, or WanImageToVideoPipeline's
            # VideoProcessor, the same preprocess): resize (Lanczos) and scale to [-1, 1].
            self.image_processor = VaeImageProcessor(vae_scale_factor=self.model.vae_scale_factor * 2)
        if isinstance(config, VaeConfig):
            self.warm_up(config.warmup_resolutions)

    def warm_up(self, sizes: list[str]) -> None:
        """Decode zeros once per "WIDTHxHEIGHT" size before taking requests: the first decode of
        a size is where cuDNN picks its convolution algorithms and the allocator grows."""
        factor = self.model.vae_scale_factor * (2 if self.batch_norm else 1)  # Flux.2's: per 2x2 patch
        for size in sizes:
            height, width = warmup_size(size, factor)
            t0 = time.perf_counter()
            channels = self.vae.config.z_dim if self.per_channel else self.vae.config.latent_channels
            channels = self.vae.bn.num_features if self.batch_norm else channels
            latents = torch.zeros(1, channels, height // factor, width // factor)
            self.decode(DecodeRequest(latents=latents))
            log.info("VAE warm-up %s: %.2fs", size, time.perf_counter() - t0)

    @torch.inference_mode()
    def decode(self, request: DecodeRequest) -> DecodeResponse:
        with measure(self.device) as metrics:
            latents = request.latents.to(self.device, self.dtype)
            video = latents.ndim == 5  # [B, C, F, h, w] (Wan) -> frames [B, F, H, W, 3]
            if self.per_channel:  # QwenImagePipeline's / WanPipeline's arithmetic, op for op
                mean = self.latents_mean.to(self.device, self.dtype)
                inv_std = 1.0 / self.latents_std.to(self.device, self.dtype)
                clip = latents if video else latents[:, :, None]  # an image is a one-frame clip
                image = self.vae.decode(clip / inv_std + mean, return_dict=False)[0]
                image = image if video else image[:, :, 0]
            elif self.batch_norm:  # Flux2KleinPipeline's arithmetic after its loop, op for op
                bn, eps = self.vae.bn, self.vae.config.batch_norm_eps
                mean = bn.running_mean.view(1, -1, 1, 1).to(self.device, latents.dtype)
                std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(self.device, latents.dtype)
                image = self.vae.decode(unpatchify(latents * std + mean), return_dict=False)[0]
            else:
                latents = latents / self.scaling_factor + self.shift_factor
                image = self.vae.decode(latents, return_dict=False)[0]
            image = (image * 0.5 + 0.5).clamp(0, 1)
            image = image.cpu().permute(0, 2, 3, 4, 1) if video else image.cpu().permute(0, 2, 3, 1)
            image = image.float()
            images = (image * 255).round().to(torch.uint8)
        return DecodeResponse(images=images, metrics=metrics)

    @torch.inference_mode()
    def encode(self, request: VaeEncodeRequest) -> VaeEncodeResponse:
        """Input images (uint8 [H, W, 3]) -> normalised latents, as the family's pipeline
        prepares them (spec.ImageConditioning): one [C, h, w] per image ("tokens", each image
        encoded on its own, so sizes may differ), or the first-frame clip's [C, f, h, w]."""
        from PIL import Image

        rule = self.spec.image_conditioning
        if rule is None:
            raise InvalidRequestError(f"image: {self.spec.family} takes no input images", "image")
        if not request.images:
            raise InvalidRequestError(f"image: {self.spec.family} needs an input image to encode", "image")
        for pixels in request.images:
            if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
                raise InvalidRequestError(f"image: expected uint8 [H, W, 3] pixels, got {pixels.dtype} "
                                          f"{list(pixels.shape)}", "image")
        images = [Image.fromarray(p.numpy()) for p in request.images]
        with measure(self.device) as metrics:
            if rule.mode == "tokens":
                latents = [self._encode_image(image, *reversed(rule.vae_size(image.width, image.height)))
                           for image in images]
            else:
                latents = [self._encode_first_frame(images[0], request)]
        return VaeEncodeResponse(latents=latents, metrics=metrics)

    def _encode_image(self, image, height: int, width: int) -> torch.Tensor:
        """The edit pipelines' _encode_vae_image on a one-frame clip: (mode - mean) / std."""
        x = self.image_processor.preprocess(image, height, width).unsqueeze(2).to(self.device, self.dtype)
        z = self.vae.encode(x).latent_dist.mode()
        mean, std = self.latents_mean.to(self.device, z.dtype), self.latents_std.to(self.device, z.dtype)
        return ((z - mean) / std)[0, :, 0].cpu()

    def _encode_first_frame(self, image, request: VaeEncodeRequest) -> torch.Tensor:
        """WanImageToVideoPipeline.prepare_latents' latent_condition: the image resized to the
        output size, then num_frames - 1 black frames, encoded whole (TI2V: the frame alone);
        (mode - mean) * (1 / std) in fp32 (the pipeline's arithmetic, which rounds differently
        from a division)."""
        if request.num_frames < 1 or request.height < 1 or request.width < 1:
            raise InvalidRequestError("image-to-video encoding needs the output's height, width and num_frames",
                                      "num_frames")
        first = self.image_processor.preprocess(image, height=request.height, width=request.width)
        clip = first.to(torch.float32)[:, :, None]
        if not self.model.index.get("expand_timesteps"):  # (Wan 2.2 TI2V: the frame alone, its first latent frame)
            clip = torch.cat([clip, clip.new_zeros(1, 3, request.num_frames - 1, request.height, request.width)], dim=2)
        z = self.vae.encode(clip.to(self.device, self.dtype)).latent_dist.mode().to(torch.float32)
        mean = self.latents_mean.to(self.device, torch.float32)
        inv_std = 1.0 / self.latents_std.to(self.device, torch.float32)
        return ((z - mean) * inv_std)[0].cpu()
