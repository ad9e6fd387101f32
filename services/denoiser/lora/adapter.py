"""The one internal LoRA layout every file format is converted into at load.

An adapter maps native module paths of the DiT (diffusers' names, which are ours: e.g.
"transformer_blocks.0.attn.to_q", "single_transformer_blocks.3.proj_out") to a low-rank pair:
the module's weight changes by  strength x scale x (up @ down),  up [out, r], down [r, in].
`scale` is alpha / r where the file carries an alpha, else 1 (diffusers' rule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraWeight:
    down: torch.Tensor  # [r, in_features]  (lora_A / lora_down)
    up: torch.Tensor  # [out_features, r]  (lora_B / lora_up)
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, device: torch.device | None = None) -> torch.Tensor:
        """scale x up @ down, in fp32: [out, in], computed on `device` (default: where the
        factors are; the full-size product is the big tensor, so move the factors, not it)."""
        device = self.up.device if device is None else device
        return self.scale * (self.up.to(device, torch.float32) @ self.down.to(device, torch.float32))


@dataclass
class LoraAdapter:
    name: str
    weights: dict[str, LoraWeight]  # native module path -> its low-rank update
    key: str = ""  # identity of the file version it came from (set by the loader), else the name

    def __post_init__(self):
        self.key = self.key or self.name
