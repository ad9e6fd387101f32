"""Per-request DiT block caching: cache-dit's DBCache decision rule (+ TaylorSeer), with the
state kept on one object per request branch instead of on the model.

cache-dit keeps its cache context on the patched transformer / pipeline, one context per model,
so one replica cannot serve concurrent or batched requests that are at different steps. Here a
`BlockCache` holds the state of one branch (positive or negative prompt) of one request, or of
one batch of requests that run their steps together; the model only exposes its blocks as a
list of functions on one hidden-state tensor (`FluxTransformer.block_steps`).

One step (`BlockCache.run`), with F = Fn_compute_blocks and B = Bn_compute_blocks:
  1. the first F blocks always run; their residual (output - input) is the probe;
  2. decide (below) whether to cache this step;
  3. compute: the middle blocks run and their residual (middle output - middle input) is kept;
     cache: middle output = middle input + kept residual (or its TaylorSeer extrapolation);
  4. the last B blocks always run.
A step is cached when it is past max_warmup_steps, under both caps (max_cached_steps in total,
max_continuous_cached_steps in a row; -1 = no cap), and either
  - dynamic (cache-dit): mean|probe - probe_prev| / mean|probe_prev| < residual_diff_threshold,
    where probe_prev is the probe of the last *computed* step; or
  - static floor (presets only): fewer than `floor(static_fraction * j)` of the j steps from
    the first cacheable one to this one have been cached, and this is not the request's last.
The static floor exists because the dynamic test alone may cache nothing at modest step counts:
cache-dit's 8 warm-up steps leave 4 candidates at 12 steps, and the fewer the steps, the more
the features change between two of them. So each preset guarantees a minimum share of cached
steps after a warm-up that scales with the step count, and the dynamic test adds more where the
features really are stable. The last step is never cached by the floor: it removes the last of
the noise, and only the dynamic test (which measured a small change) may skip it.

Presets (slow < medium < fast < ultra in aggressiveness; W(n) = warm-up at n steps):

    preset  F  B  threshold  W(n)                     max_cached  max_continuous  taylor  floor
    slow    8  8  0.05       min(8, ceil(0.35 n))     -1          1               0       1/4
    medium  4  4  0.08       min(6, ceil(0.25 n))     -1          2               1       1/3
    fast    2  2  0.12       min(4, ceil(0.20 n))     -1          3               1       1/2
    ultra   1  0  0.20       min(3, ceil(0.15 n))     -1          4               2       2/3

Without a preset the defaults are cache-dit's (F8B0, threshold 0.08, 8 warm-up steps, no caps,
TaylorSeer off) and there is no static floor: pure DBCache. Explicit fields override a preset.

Same as cache-dit: the Fn/Bn/middle split; the probe is the Fn residual and it is compared with
the probe of the last computed step (cached steps do not replace it); the relative L1 metric;
steps with index < max_warmup_steps always compute; threshold 0 turns the dynamic test off
(without a preset: never caches) and >= 1 always caches without computing the metric; both caps; TaylorSeer as a Taylor series in step-index
units whose derivatives are backward differences between computed steps, divided by the number
of steps between them (order 0 = plain reuse of the last residual).
Different:
  - state per request branch (cache-dit: per model; its separate-CFG mode keeps two states, as
    we do with one BlockCache per branch);
  - Flux's 19 double + 38 single blocks are one 57-step sequence on the joint [text; image]
    state, so one residual covers both streams (cache-dit caches image and text residuals of
    its block lists separately);
  - max_continuous_cached_steps counts the current run of cached steps (cache-dit's counter only
    resets when that cap forces a compute, so separate runs add up);
  - under sequence parallelism the caller's `agree` averages the ratio across ranks (cache-dit
    all-reduces numerator and denominator before dividing);
  - Fn/Bn are clamped to the model's depth, keeping at least one middle block, since a request's
    policy does not know the model (cache-dit asserts); Fn >= 1 as in cache-dit;
  - TaylorSeer keeps its terms in fp32 and starts differencing at the second computed step
    (cache-dit: model dtype, no differences before step 2);
  - the static floor (cache-dit's nearest is a user-supplied steps_computation_mask); no
    warmup_interval, max_accumulated_residual_diff or token-importance options;
  - a changed hidden-state shape is an error rather than a silent recompute, because the
    decision must not depend on rank-local data (see `agree`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from services.runtime.cache_policy import CachePolicy, ResolvedCache  # noqa: F401  (re-exported)


class BlockCache:
    """State of one request branch (positive or negative prompt) across its steps.

    Each `run` call is the branch's next step. When a batch of requests runs its steps through
    one forward, it uses one BlockCache per branch and the requests share every decision: the
    metric is over the whole batch, so the batch must be formed from requests with equal
    `CachePolicy.key()` and step count that stay together from the first step to the last.

    `agree` (sequence parallelism) maps this rank's 0-dim metric to the value all ranks of the
    group agree on (e.g. an all-reduce mean). It is called exactly once in every step whose
    metric is computed, and whether a step computes its metric depends only on the step counters
    and the policy, which are the same on every rank, so all ranks take the same branch."""

    def __init__(self, policy: ResolvedCache, agree: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.policy = policy
        self._agree = agree
        self._step = 0
        self._computed = 0
        self._cached = 0
        self._cached_run = 0  # cached steps immediately before this one
        self._probe: torch.Tensor | None = None  # Fn residual of the last computed step
        self._last_computed_step = -1
        # Taylor terms of the middle residual at the last computed step: [R, dR, d2R, ...];
        # just [R] (model dtype) when TaylorSeer is off.
        self._terms: list[torch.Tensor] = []
        self._residual_dtype = torch.float32

    @property
    def enabled(self) -> bool:
        return self.policy.enabled

    @property
    def computed_steps(self) -> int:
        return self._computed

    @property
    def cached_steps(self) -> int:
        return self._cached

    def run(
        self, steps: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, step_index: int | None = None
    ):
        """Run one step's blocks on hidden state `x`. `step_index`, if given, must be the step
        this cache expects next (a check against skipped or repeated calls)."""
        i = self._step
        if step_index is not None and step_index != i:
            raise ValueError(f"BlockCache expected step {i}, got step {step_index}")
        if i >= self.policy.num_steps:
            raise ValueError(f"BlockCache was resolved for {self.policy.num_steps} steps; step {i} is past the end")
        self._step += 1
        if not self.policy.enabled:
            for step in steps:
                x = step(x)
            self._computed += 1
            return x

        fn, bn = self._split(len(steps))
        h = x
        for step in steps[:fn]:
            h = step(h)
        probe = h - x
        if self._probe is not None and probe.shape != self._probe.shape:
            raise ValueError(
                f"hidden state shape changed from {tuple(self._probe.shape)} to {tuple(probe.shape)}; "
                "a BlockCache belongs to one fixed batch"
            )

        if self._should_cache(i, probe):
            h = h + self._residual(i)
            self._cached += 1
            self._cached_run += 1
        else:
            middle_in = h
            for step in steps[fn : len(steps) - bn]:
                h = step(h)
            self._remember(i, h - middle_in)
            self._probe = probe
            self._computed += 1
            self._cached_run = 0

        for step in steps[len(steps) - bn :]:
            h = step(h)
        return h

    def _split(self, depth: int) -> tuple[int, int]:
        # Keep at least one middle block where the model has two or more.
        fn = min(self.policy.Fn_compute_blocks, max(depth - 1, 1))
        bn = max(0, min(self.policy.Bn_compute_blocks, depth - fn - 1))
        return fn, bn

    def _should_cache(self, i: int, probe: torch.Tensor) -> bool:
        p = self.policy
        if i < p.max_warmup_steps or self._probe is None:
            return False
        if 0 <= p.max_cached_steps <= self._cached:
            return False
        if 0 <= p.max_continuous_cached_steps <= self._cached_run:
            return False

        since_warmup = i - max(p.max_warmup_steps, 1) + 1  # steps in 1..this one that may be cached
        static = i < p.num_steps - 1 and self._cached < math.floor(p.static_fraction * since_warmup)

        threshold = p.residual_diff_threshold
        if threshold <= 0.0:
            return static
        if threshold >= 1.0:
            return True
        prev = self._probe
        metric = (probe - prev).abs().mean(dtype=torch.float32) / prev.abs().mean(dtype=torch.float32)
        if self._agree is not None:
            metric = self._agree(metric)
        # A NaN metric (an all-zero previous probe) compares False: compute.
        return bool(metric < threshold) or static

    def _remember(self, i: int, residual: torch.Tensor) -> None:
        order = self.policy.taylorseer_order
        self._residual_dtype = residual.dtype
        if order == 0:
            self._terms = [residual]
        else:
            terms = [residual.float()]
            window = i - self._last_computed_step
            for k in range(min(order, len(self._terms))):
                terms.append((terms[k] - self._terms[k]) / window)
            self._terms = terms
        self._last_computed_step = i

    def _residual(self, i: int) -> torch.Tensor:
        if self.policy.taylorseer_order == 0:
            return self._terms[0]
        elapsed = i - self._last_computed_step
        out = self._terms[0]
        for k, term in enumerate(self._terms[1:], start=1):
            out = out + term * (elapsed**k / math.factorial(k))
        return out.to(self._residual_dtype)
