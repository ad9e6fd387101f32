"""The only code that runs the DiT on the device.

`prepare` moves a request's conditioning to the device once and builds what stays fixed across
steps (RoPE tables, guidance vector); `predict` is one model forward per conditioning branch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.denoiser.latents import PackedLatents2x2
from services.runtime.messages import Conditioning


@dataclass
class BranchInputs:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepInputs:
    positive: BranchInputs
    negative: BranchInputs | None
    guidance: torch.Tensor | None


class DenoiserRunner:
    def __init__(self, model: torch.nn.Module, layout: PackedLatents2x2, device: torch.device, dtype: torch.dtype):
        self.model, self.layout, self.device, self.dtype = model, layout, device, dtype

    def prepare(
        self, positive: Conditioning, negative: Conditioning | None, guidance_scale: float, batch: int, h: int, w: int
    ) -> StepInputs:
        img_ids = self.layout.image_ids(h, w, self.device)
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32).expand(batch)
        return StepInputs(
            positive=self._branch(positive, img_ids),
            negative=self._branch(negative, img_ids) if negative is not None else None,
            guidance=guidance,
        )

    def _branch(self, cond: Conditioning, img_ids: torch.Tensor) -> BranchInputs:
        embeds = cond.prompt_embeds.to(self.device, self.dtype)
        txt_ids = self.layout.text_ids(embeds.shape[1], self.device)
        return BranchInputs(
            prompt_embeds=embeds,
            pooled_prompt_embeds=cond.pooled_prompt_embeds.to(self.device, self.dtype),
            rope=self.model.rope(txt_ids, img_ids),
        )

    @torch.inference_mode()
    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, branch: BranchInputs, guidance) -> torch.Tensor:
        return self.model(
            latents, branch.prompt_embeds, branch.pooled_prompt_embeds, timestep, branch.rope, guidance
        )
