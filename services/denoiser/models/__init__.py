"""Native DiT families, one file each; a pipeline spec's `denoiser` names one of these keys."""

from __future__ import annotations

from dataclasses import dataclass

from services.denoiser.latents import CenteredLatents2x2, Flux2Latents, PackedLatents2x2, WanLatents, ZImageLatents
from services.denoiser.models.flux import FluxConfig, FluxTransformer
from services.denoiser.models.flux2 import Flux2Config, Flux2Transformer
from services.denoiser.models.qwen_image import QwenImageConfig, QwenImageTransformer
from services.denoiser.models.wan import WanConfig, WanTransformer
from services.denoiser.models.z_image import ZImageConfig, ZImageTransformer


@dataclass(frozen=True)
class NativeFamily:
    config_cls: type
    model_cls: type
    # diffusers class names whose weights this family loads unchanged.
    diffusers_classes: tuple[str, ...]
    # Latents <-> tokens and their RoPE position ids (services/denoiser/latents.py).
    layout: type = PackedLatents2x2


FAMILIES = {
    "flux": NativeFamily(FluxConfig, FluxTransformer, ("FluxTransformer2DModel",)),
    "qwen_image": NativeFamily(QwenImageConfig, QwenImageTransformer, ("QwenImageTransformer2DModel",),
                               CenteredLatents2x2),
    "z_image": NativeFamily(ZImageConfig, ZImageTransformer, ("ZImageTransformer2DModel",), ZImageLatents),
    "wan": NativeFamily(WanConfig, WanTransformer, ("WanTransformer3DModel",), WanLatents),
    "flux2": NativeFamily(Flux2Config, Flux2Transformer, ("Flux2Transformer2DModel",), Flux2Latents),
}
