"""Per-request block caching (services/denoiser/cache.py): toy block chains for the decision rule,
the tiny Flux checkpoint for the model integration and the presets."""

import itertools
import json

import pytest
import torch

from services.denoiser.cache import BlockCache, CachePolicy
from services.denoiser.latents import PackedLatents2x2
from services.denoiser.loop import euler_step
from services.denoiser.schedule import FlowMatchSchedule
from services.denoiser.weights import load_native_transformer
from services.runtime.registry import ModelDir

# ---------------------------------------------------------------------------------------------
# toy chains


class Chain:
    """Blocks x -> x + c_k * drift: the residual of every block changes with `drift` (one value
    per step), and `calls[k]` counts how often block k ran."""

    def __init__(self, depth: int):
        self.calls = [0] * depth
        self.drift = 1.0
        self.steps = [self._block(k) for k in range(depth)]

    def _block(self, k: int):
        def step(x):
            self.calls[k] += 1
            return x + (k + 1) * self.drift

        return step


def _run(cache: BlockCache, chain: Chain, num_steps: int, drift=lambda i: 1.0):
    """Returns, per step, whether the middle blocks ran (the middle one is always a middle block)."""
    x = torch.zeros(2, 3)
    middle = len(chain.calls) // 2
    computed = []
    for i in range(num_steps):
        chain.drift = drift(i)
        before = chain.calls[middle]
        x = cache.run(chain.steps, x)
        computed.append(chain.calls[middle] > before)
    return computed


def test_disabled_runs_every_block():
    chain = Chain(5)
    cache = BlockCache(CachePolicy(enabled=False, preset="ultra").resolved(6))
    assert _run(cache, chain, 6) == [True] * 6
    assert chain.calls == [6] * 5
    assert (cache.computed_steps, cache.cached_steps) == (6, 0)


def test_cached_step_adds_the_kept_middle_residual():
    # Fn=1, Bn=1 over 4 blocks: middle = blocks 1, 2 (residual 2 + 3 = 5 per unit drift).
    policy = CachePolicy(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.99, max_warmup_steps=0)
    chain, cache = Chain(4), BlockCache(policy.resolved(3))
    x = torch.zeros(1, 2)
    chain.drift = 1.0
    y0 = cache.run(chain.steps, x)  # step 0: no previous probe, computes
    assert torch.equal(y0, x + 1 + 2 + 3 + 4)
    chain.drift = 1.1  # probe changes by 10% < 0.99: cached
    y1 = cache.run(chain.steps, x)
    # first block and last block with the new drift, middle residual of step 0
    assert torch.allclose(y1, x + 1.1 + 5 + 4 * 1.1)
    assert chain.calls == [2, 1, 1, 2]
    assert (cache.computed_steps, cache.cached_steps) == (1, 1)


def test_threshold_decides():
    policy = CachePolicy(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.2, max_warmup_steps=0)
    drifts = [1.0, 1.1, 1.5, 1.55, 3.0]
    # vs the last *computed* probe: 1.1/1.0 cache; 1.5/1.0 compute; 1.55/1.5 cache; 3.0/1.5 compute
    cache = BlockCache(policy.resolved(5))
    assert _run(cache, Chain(3), 5, lambda i: drifts[i]) == [True, False, True, False, True]


def test_threshold_edges_follow_cache_dit():
    never = CachePolicy(Fn_compute_blocks=1, residual_diff_threshold=0.0, max_warmup_steps=0)
    always = CachePolicy(Fn_compute_blocks=1, residual_diff_threshold=1.0, max_warmup_steps=0)
    assert _run(BlockCache(never.resolved(4)), Chain(3), 4) == [True] * 4
    # >= 1 always caches, even when the probe changed a lot (step 0 has no probe to compare)
    assert _run(BlockCache(always.resolved(4)), Chain(3), 4, lambda i: 10.0**i) == [True, False, False, False]


def test_warmup_and_caps():
    base = {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.99}
    runs = {
        "warmup": CachePolicy(**base, max_warmup_steps=3),
        "total": CachePolicy(**base, max_warmup_steps=0, max_cached_steps=2),
        "continuous": CachePolicy(**base, max_warmup_steps=0, max_continuous_cached_steps=2),
    }
    got = {name: _run(BlockCache(p.resolved(8)), Chain(3), 8) for name, p in runs.items()}
    assert got["warmup"] == [True, True, True, False, False, False, False, False]
    assert got["total"] == [True, False, False, True, True, True, True, True]
    assert got["continuous"] == [True, False, False, True, False, False, True, False]


def test_static_floor_of_a_preset():
    # The probe changes 10x per step, so the dynamic test never fires; "fast" at 12 steps warms
    # up for 3 steps, then caches every second step (floor 1/2), but never the last step.
    expected = [True] * 4 + [False, True] * 4
    fast = BlockCache(CachePolicy(preset="fast").resolved(12))
    assert _run(fast, Chain(6), 12, lambda i: 10.0**i) == expected
    # threshold 0 turns the dynamic test off, not the floor; no metric is computed
    calls = []
    off = CachePolicy(preset="fast", residual_diff_threshold=0.0).resolved(12)
    assert _run(BlockCache(off, agree=calls.append), Chain(6), 12) == expected
    assert calls == []
    # without a preset there is no floor (cache-dit's DBCache)
    plain = CachePolicy(Fn_compute_blocks=1, max_warmup_steps=3).resolved(12)
    assert _run(BlockCache(plain), Chain(6), 12, lambda i: 10.0**i) == [True] * 12


def test_taylorseer_order1_extrapolates_a_linear_residual():
    # Middle residual grows linearly with the step: 3 * (1 + 0.1 i). Order 1 reproduces it exactly
    # on cached steps, even two steps after the last computed one; order 0 reuses a stale value.
    fields = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.99, "max_warmup_steps": 2}
    steps_out = {}
    for order in (0, 1):
        chain = Chain(2)
        cache = BlockCache(CachePolicy(**fields, taylorseer_order=order).resolved(5))
        outs = []
        for i in range(5):
            chain.drift = 1.0 + 0.1 * i
            outs.append(cache.run(chain.steps, torch.zeros(1, 4, dtype=torch.float64)))
        assert cache.cached_steps == 3
        steps_out[order] = outs
    for i in range(2, 5):
        exact = 3 * (1.0 + 0.1 * i)
        assert torch.allclose(steps_out[1][i], torch.full((1, 4), exact, dtype=torch.float64))
        assert not torch.allclose(steps_out[0][i], torch.full((1, 4), exact, dtype=torch.float64))
    assert steps_out[1][0].dtype == torch.float64


def test_taylorseer_order2_extrapolates_a_quadratic_on_a_uniform_grid():
    # Backward differences over 3 computed steps at spacing 1: with Y(i) = 2 + i^2 the Taylor
    # estimate one step ahead is Y(2) + dY + d2Y / 2 = 6 + 3 + 1 = 10 at i = 3 (exact: 11) --
    # TaylorSeer's estimator, not an interpolating polynomial.
    policy = CachePolicy(Fn_compute_blocks=1, residual_diff_threshold=0.99, max_warmup_steps=3, taylorseer_order=2)
    chain, cache = Chain(2), BlockCache(policy.resolved(4))
    out = None
    for i in range(4):
        chain.drift = 1.0 + i * i / 2  # block 1's residual = 2 * drift = 2 + i^2
        out = cache.run(chain.steps, torch.zeros(1))
    assert cache.cached_steps == 1
    assert torch.allclose(out, torch.tensor([5.5 + 10.0]))  # block 0 at i = 3, then the estimate


def test_agree_is_called_once_per_decided_step_and_decides():
    calls = []

    def force_compute(metric):
        assert metric.dim() == 0
        calls.append(metric.item())
        return torch.tensor(float("inf"))

    policy = CachePolicy(Fn_compute_blocks=1, residual_diff_threshold=0.5, max_warmup_steps=2)
    cache = BlockCache(policy.resolved(6), agree=force_compute)
    assert _run(cache, Chain(3), 6) == [True] * 6  # probe never changes, yet every step computes
    assert calls == [0.0] * 4  # steps 2..5; warm-up steps have no metric

    calls.clear()
    cache = BlockCache(policy.resolved(6), agree=lambda m: calls.append(1) or torch.tensor(0.0))
    assert _run(cache, Chain(3), 6, lambda i: 10.0**i) == [True, True, False, False, False, False]
    assert len(calls) == 4


def test_step_index_and_shape_are_checked():
    cache = BlockCache(CachePolicy(Fn_compute_blocks=1, max_warmup_steps=0, residual_diff_threshold=0.5).resolved(3))
    chain = Chain(3)
    with pytest.raises(ValueError, match="expected step 0"):
        cache.run(chain.steps, torch.zeros(2), step_index=1)
    cache.run(chain.steps, torch.zeros(2), step_index=0)
    with pytest.raises(ValueError, match="shape changed"):
        cache.run(chain.steps, torch.zeros(3))  # (a failed step still counts)
    cache.run(chain.steps, torch.zeros(2))
    with pytest.raises(ValueError, match="past the end"):
        cache.run(chain.steps, torch.zeros(2))


def test_fn_bn_are_clamped_to_the_depth():
    # F8B8 on 3 blocks: F2B0, one middle block is still cached.
    policy = CachePolicy(Fn_compute_blocks=8, Bn_compute_blocks=8, residual_diff_threshold=0.99, max_warmup_steps=0)
    chain = Chain(3)
    _run(BlockCache(policy.resolved(3)), chain, 3)
    assert chain.calls == [3, 3, 1]


# ---------------------------------------------------------------------------------------------
# policy


def test_policy_resolution():
    default = CachePolicy().resolved(28)
    assert (default.Fn_compute_blocks, default.Bn_compute_blocks) == (8, 0)  # cache-dit's defaults
    assert (default.residual_diff_threshold, default.max_warmup_steps) == (0.08, 8)
    assert (default.max_cached_steps, default.max_continuous_cached_steps, default.taylorseer_order) == (-1, -1, 0)
    assert default.static_fraction == 0

    fast = CachePolicy(preset="fast", Fn_compute_blocks=5, max_warmup_steps=0).resolved(12)
    assert (fast.Fn_compute_blocks, fast.Bn_compute_blocks, fast.max_warmup_steps) == (5, 2, 0)
    assert CachePolicy(preset="slow").resolved(12).max_warmup_steps == 5
    assert CachePolicy(preset="slow").resolved(50).max_warmup_steps == 8

    resolved = [CachePolicy(preset=p).resolved(28) for p in ("slow", "medium", "fast", "ultra")]
    for a, b in itertools.pairwise(resolved):
        assert a.residual_diff_threshold < b.residual_diff_threshold
        assert a.Fn_compute_blocks + a.Bn_compute_blocks > b.Fn_compute_blocks + b.Bn_compute_blocks
        assert a.max_warmup_steps > b.max_warmup_steps
        assert a.static_fraction < b.static_fraction


def test_policy_key():
    assert CachePolicy(preset="fast").key() == CachePolicy(preset="fast").key()
    assert CachePolicy(preset="fast").key() != CachePolicy(preset="ultra").key()
    assert CachePolicy(enabled=False, preset="fast").key() == CachePolicy(enabled=False).key()
    hash(CachePolicy(preset="medium", max_cached_steps=3).key())


@pytest.mark.parametrize(
    "fields",
    [
        {"Fn_compute_blocks": -1},
        {"Fn_compute_blocks": 0},
        {"Bn_compute_blocks": -2},
        {"preset": "turbo"},
        {"residual_diff_threshold": -0.1},
        {"residual_diff_threshold": float("nan")},
        {"max_warmup_steps": -1},
        {"max_cached_steps": -2},
        {"max_continuous_cached_steps": -5},
        {"taylorseer_order": -1},
        {"taylorseer_order": 9},
        {"threshold": 0.1},
    ],
)
def test_policy_rejects(fields):
    with pytest.raises(ValueError):
        CachePolicy(**fields)


def test_resolved_rejects_zero_steps():
    with pytest.raises(ValueError, match="num_steps"):
        CachePolicy().resolved(0)


# ---------------------------------------------------------------------------------------------
# tiny Flux


@pytest.fixture(scope="module")
def flux(flux_dev_dir):
    model = load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=torch.float32, device=torch.device("cpu"))
    scheduler_config = json.loads((flux_dev_dir / "scheduler" / "scheduler_config.json").read_text())
    return model, FlowMatchSchedule(scheduler_config)


def _flux_inputs(cfg, batch=2, h=8, w=8, text_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = PackedLatents2x2(cfg.in_channels // 4, 8)
    x = torch.randn(batch, (h // 2) * (w // 2), cfg.in_channels, generator=g)
    ctx = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    guidance = torch.full((batch,), 3.5)
    ids = (layout.text_ids(text_len, torch.device("cpu")), layout.image_ids(h, w, torch.device("cpu")))
    return x, ctx, pooled, guidance, ids


def _sample(model, schedule, num_steps, cache=None):
    """The Euler loop on the tiny Flux; returns the final latents."""
    x, ctx, pooled, guidance, (txt_ids, img_ids) = _flux_inputs(model.config)
    rope = model.rope(txt_ids, img_ids)
    sigmas = schedule.for_request(num_steps, x.shape[1], torch.device("cpu"))
    with torch.no_grad():
        for i, t in enumerate(sigmas.timesteps):
            timestep = t.expand(x.shape[0]) / 1000
            v = model(x, ctx, pooled, timestep, rope, guidance, cache=cache)
            x = euler_step(x, v, sigmas.sigmas[i], sigmas.sigmas[i + 1])
    return x


def test_flux_block_steps_match_the_forward(flux):
    model, _ = flux
    x, ctx, pooled, guidance, (txt_ids, img_ids) = _flux_inputs(model.config)
    rope = model.rope(txt_ids, img_ids)
    t = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        expected = model(x, ctx, pooled, t, rope, guidance)
        # a policy on a step where it computes runs every block once, in order: same bits
        cache = BlockCache(CachePolicy(preset="ultra").resolved(1))
        got = model(x, ctx, pooled, t, rope, guidance, cache=cache)
    assert cache.computed_steps == 1
    blocks = model.config.num_layers + model.config.num_single_layers
    assert len(model.block_steps([None] * (blocks + 1), rope, 7)) == blocks
    assert torch.equal(got, expected)


def test_flux_disabled_cache_is_bitwise_the_uncached_model(flux):
    model, schedule = flux
    expected = _sample(model, schedule, 6)
    assert torch.equal(_sample(model, schedule, 6, BlockCache(CachePolicy(enabled=False).resolved(6))), expected)
    # warm-up over every step: every step computes, through the cached path's block chain
    always_compute = BlockCache(CachePolicy(preset="ultra", max_warmup_steps=6).resolved(6))
    assert torch.equal(_sample(model, schedule, 6, always_compute), expected)
    assert always_compute.computed_steps == 6


@pytest.mark.parametrize("num_steps", [12, 28])
def test_flux_presets_cache_and_are_ordered(flux, num_steps):
    model, schedule = flux
    reference = _sample(model, schedule, num_steps)
    cached, errors = [], []
    for preset in ("slow", "medium", "fast", "ultra"):
        cache = BlockCache(CachePolicy(preset=preset).resolved(num_steps))
        out = _sample(model, schedule, num_steps, cache)
        assert cache.computed_steps + cache.cached_steps == num_steps
        cached.append(cache.cached_steps)
        errors.append(((out - reference).norm() / reference.norm()).item())
    assert cached[0] >= 1, cached
    assert cached == sorted(cached), cached
    assert cached[-1] > cached[0], cached
    assert max(errors) < 0.5, errors  # cached, not broken
