"""A small CNN that reads a 64x64 picture back into (shape, color, background, style): the judge
of prompt adherence for the embedded model, its cache presets, fp8, parallel layouts and the
example style LoRA (benchmarks/quality.py, tests/cpu/test_quality.py).

Trained by training/train_default.py on the same rendered distribution, with blur, noise and
color jitter so that slightly soft generated pictures read the same as clean renders."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.shapes import BACKGROUNDS, COLORS, SHAPES, STYLES

HEADS = {"shape": SHAPES, "color": COLORS, "background": BACKGROUNDS, "style": STYLES}
WEIGHTS = Path(__file__).resolve().parent.parent / "tests" / "assets" / "shape_classifier.safetensors"


class ShapeClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 2 * width, 4 * width]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in pairwise(chans))
        self.heads = nn.ModuleDict({name: nn.Linear(chans[-1], len(labels)) for name, labels in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels [N, 3, 64, 64] in [0, 1] -> logits per head."""
        x = pixels * 2 - 1
        for conv in self.convs:
            x = F.silu(conv(x))
        x = x.mean(dim=(2, 3))
        return {name: head(x) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> list[dict[str, str]]:
        logits = self(pixels)
        idx = {name: v.argmax(-1).tolist() for name, v in logits.items()}
        return [{name: HEADS[name][idx[name][i]] for name in HEADS} for i in range(pixels.shape[0])]


def load_classifier(path: str | Path = WEIGHTS) -> ShapeClassifier:
    from safetensors.torch import load_file

    model = ShapeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur (down- then up-sampling by a random factor), color jitter and noise, per picture."""
    n, device = pixels.shape[0], pixels.device
    u = torch.rand(n, 3, generator=generator).to(device)
    soft = F.interpolate(F.interpolate(pixels, scale_factor=0.5, mode="bilinear", antialias=True),
                         size=pixels.shape[-2:], mode="bilinear")
    x = torch.where(u[:, :1, None, None] < 0.5, soft, pixels)
    x = x * (1 + (u[:, 1:2, None, None] - 0.5) * 0.2)
    noise = torch.randn(pixels.shape, generator=generator).to(device)
    return (x + noise * u[:, 2:3, None, None] * 0.08).clamp(0, 1)
