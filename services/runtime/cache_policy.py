"""A request's DiT caching policy (pure data: the router and gateway use it without torch).
What the fields and presets mean, and the caching itself: services/denoiser/cache.py."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Preset = Literal["slow", "medium", "fast", "ultra"]


@dataclass(frozen=True)
class _PresetValues:
    Fn_compute_blocks: int
    Bn_compute_blocks: int
    residual_diff_threshold: float
    warmup_max_steps: int  # warm-up = min(warmup_max_steps, ceil(warmup_fraction * num_steps))
    warmup_fraction: Fraction  # exact, so that ceil(0.35 * 20) is 7
    max_cached_steps: int
    max_continuous_cached_steps: int
    taylorseer_order: int
    static_fraction: Fraction


_PRESETS: dict[str, _PresetValues] = {
    # F, B, threshold, warm-up cap, warm-up fraction, max cached, max continuous, TaylorSeer, floor
    "slow": _PresetValues(8, 8, 0.05, 8, Fraction(35, 100), -1, 1, 0, Fraction(1, 4)),
    "medium": _PresetValues(4, 4, 0.08, 6, Fraction(25, 100), -1, 2, 1, Fraction(1, 3)),
    "fast": _PresetValues(2, 2, 0.12, 4, Fraction(20, 100), -1, 3, 1, Fraction(1, 2)),
    "ultra": _PresetValues(1, 0, 0.20, 3, Fraction(15, 100), -1, 4, 2, Fraction(2, 3)),
}
# cache-dit's DBCache defaults, used field by field when there is no preset.
_DBCACHE_DEFAULTS = _PresetValues(8, 0, 0.08, 8, Fraction(1), -1, -1, 0, Fraction(0))


@dataclass(frozen=True)
class ResolvedCache:
    """A policy with every value decided for a request of `num_steps` steps."""

    enabled: bool
    num_steps: int
    Fn_compute_blocks: int = 8
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    taylorseer_order: int = 0
    # Minimum share of post-warm-up steps that are cached (0 = no static floor); see module doc.
    static_fraction: Fraction = Fraction(0)


class CachePolicy(BaseModel):
    """A request's caching choice: a preset, explicit DBCache fields, or both (fields win).
    Field errors raise pydantic's ValidationError, a ValueError."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    preset: Preset | None = None
    Fn_compute_blocks: int | None = Field(None, ge=1)
    Bn_compute_blocks: int | None = Field(None, ge=0)
    residual_diff_threshold: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    max_warmup_steps: int | None = Field(None, ge=0)
    max_cached_steps: int | None = Field(None, ge=-1)
    max_continuous_cached_steps: int | None = Field(None, ge=-1)
    # Higher orders extrapolate noise more than signal; TaylorSeer's authors use 1 or 2.
    taylorseer_order: int | None = Field(None, ge=0, le=4)

    def resolved(self, num_steps: int) -> ResolvedCache:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not self.enabled:
            return ResolvedCache(enabled=False, num_steps=num_steps)
        base = _PRESETS[self.preset] if self.preset is not None else _DBCACHE_DEFAULTS
        warmup = min(base.warmup_max_steps, math.ceil(base.warmup_fraction * num_steps))

        def pick(name: str, default):
            value = getattr(self, name)
            return default if value is None else value

        return ResolvedCache(
            enabled=True,
            num_steps=num_steps,
            Fn_compute_blocks=pick("Fn_compute_blocks", base.Fn_compute_blocks),
            Bn_compute_blocks=pick("Bn_compute_blocks", base.Bn_compute_blocks),
            residual_diff_threshold=pick("residual_diff_threshold", base.residual_diff_threshold),
            max_warmup_steps=pick("max_warmup_steps", warmup),
            max_cached_steps=pick("max_cached_steps", base.max_cached_steps),
            max_continuous_cached_steps=pick("max_continuous_cached_steps", base.max_continuous_cached_steps),
            taylorseer_order=pick("taylorseer_order", base.taylorseer_order),
            static_fraction=base.static_fraction,
        )

    def key(self) -> tuple:
        """Requests whose keys are equal may share a batch (and so a caching decision)."""
        if not self.enabled:
            return (False,)
        return tuple(getattr(self, name) for name in type(self).model_fields)
