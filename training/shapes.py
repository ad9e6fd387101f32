"""The synthetic world the embedded default model is trained on and judged by.

One picture = one shape (circle, square, triangle) in one color on a white or black background,
drawn filled or, for the example style LoRA, outlined. Pictures are rendered on the fly from
signed distance functions in torch (any device, a whole batch at once, antialiased by the
distance itself), so no dataset is stored or downloaded and the GPU trainer never waits on a
CPU drawing loop. Captions come from a small grammar:

    "a [small |large ]{color} {shape} on a {background} background"

Position is random and never named; the size word is present half of the time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("white", "black")
SIZES = ("small", "large")
STYLES = ("filled", "outlined")

RGB = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}

# Half-extent of a shape as a fraction of the picture's side, per size word.
RADIUS = {"small": (0.12, 0.19), "large": (0.25, 0.34)}
OUTLINE_WIDTH = 0.045  # of the side: ~3 px at 64 px, thick enough to survive the VAE


@dataclass(frozen=True)
class Scene:
    shape: int
    color: int
    background: int
    size: int
    named_size: bool  # whether the caption says "small" / "large"

    @property
    def caption(self) -> str:
        size = f"{SIZES[self.size]} " if self.named_size else ""
        return f"a {size}{COLORS[self.color]} {SHAPES[self.shape]} on a {BACKGROUNDS[self.background]} background"


def caption(shape: str, color: str, background: str, size: str | None = None) -> str:
    return f"a {size + ' ' if size else ''}{color} {shape} on a {background} background"


def all_captions() -> list[str]:
    """Every caption the grammar makes (72): the trainer's whole text distribution."""
    return [caption(s, c, b, z) for s in SHAPES for c in COLORS for b in BACKGROUNDS for z in (None, *SIZES)]


def eval_prompts() -> list[tuple[str, dict]]:
    """The 24 (shape, color, background) prompts the quality benchmark and tests judge."""
    return [(caption(s, c, b), dict(shape=s, color=c, background=b)) for s in SHAPES for c in COLORS for b in BACKGROUNDS]


def sample_scenes(n: int, generator: torch.Generator) -> list[Scene]:
    r = torch.randint(0, 2**31 - 1, (n, 5), generator=generator).tolist()
    return [Scene(a % 3, b % 4, c % 2, d % 2, e % 2 == 0) for a, b, c, d, e in r]


def _sdf(shape: torch.Tensor, px: torch.Tensor, py: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) from each pixel to each picture's shape, centred at the
    origin. shape/radius: [N, 1, 1]; px/py: [N, H, W]. All three are computed and one is kept:
    cheaper on a GPU than a loop over pictures."""
    circle = torch.sqrt(px**2 + py**2) - radius
    square = torch.maximum(px.abs(), py.abs()) - radius  # half-side = radius
    # Equilateral triangle pointing up, inscribed in the circle of this radius (Inigo Quilez's SDF).
    k = 3**0.5
    r = radius / 2  # inradius
    x, y = px.abs() - r * k, r - py  # image y grows downwards: flip it so the apex is up
    flip = x + k * y > 0
    x, y = torch.where(flip, (x - k * y) / 2, x), torch.where(flip, (-k * x - y) / 2, y)
    x = x - torch.minimum(torch.maximum(x, -2 * r * k), torch.zeros_like(x))
    triangle = -torch.sqrt(x**2 + y**2) * torch.sign(y)
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def render(scenes: list[Scene], size: int = 64, *, outlined: bool = False, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Pictures [N, 3, size, size] in [0, 1]. Radius, centre and a slight color jitter are drawn
    from `generator` (CPU), so the same generator state gives the same pictures on any device."""
    n = len(scenes)
    g = generator or torch.Generator().manual_seed(0)
    u = torch.rand(n, 6, generator=g)
    lo = torch.tensor([RADIUS[SIZES[s.size]][0] for s in scenes])
    hi = torch.tensor([RADIUS[SIZES[s.size]][1] for s in scenes])
    radius = lo + (hi - lo) * u[:, 0]
    margin = radius + 0.03
    cx = margin + (1 - 2 * margin) * u[:, 1]
    cy = margin + (1 - 2 * margin) * u[:, 2]
    fg = (torch.tensor([RGB[COLORS[s.color]] for s in scenes]) + (u[:, 3:6] - 0.5) * 0.08).clamp(0, 1)
    bg = torch.tensor([RGB[BACKGROUNDS[s.background]] for s in scenes])
    shape = torch.tensor([s.shape for s in scenes])

    def col(t: torch.Tensor) -> torch.Tensor:  # [N] -> [N, 1, 1] on the device
        return t.view(n, 1, 1).to(device)

    coords = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    d = _sdf(col(shape), xx - col(cx), yy - col(cy), col(radius))
    if outlined:
        d = d.abs() - OUTLINE_WIDTH / 2
    alpha = torch.clamp(0.5 - d * size, 0.0, 1.0)[:, None]  # a one-pixel antialiased edge
    return bg.view(n, 3, 1, 1).to(device) * (1 - alpha) + fg.view(n, 3, 1, 1).to(device) * alpha
