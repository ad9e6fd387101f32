"""Native DiT families, one file each; a pipeline spec's `denoiser` names one of these keys."""

from __future__ import annotations

from dataclasses import dataclass

from services.denoiser.models.flux import FluxConfig, FluxTransformer


@dataclass(frozen=True)
class NativeFamily:
    config_cls: type
    model_cls: type
    # diffusers class names whose weights this family loads unchanged.
    diffusers_classes: tuple[str, ...]


FAMILIES = {
    "flux": NativeFamily(FluxConfig, FluxTransformer, ("FluxTransformer2DModel",)),
}
