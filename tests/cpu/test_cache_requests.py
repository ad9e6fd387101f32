"""Per-request DiT caching through the router: the policy travels with the request, batches
group by policy, stats come back, and a disabled policy changes nothing. The caching rules
themselves: test_cache.py."""

import asyncio

import numpy as np
import pytest

from services.cli import build_in_process_router
from services.runtime.config import GenerateRequest, RouterConfig, StageConfig

KW = dict(prompt="a red circle", height=32, width=48, num_inference_steps=12, seed=3)


@pytest.fixture(scope="module")
def router(flux_dev_dir):
    # a wide window so concurrent requests would share a batch if their keys allowed it
    return build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"),
                                   RouterConfig(batch_window_ms=300, max_batch_size=4))


def _run(router, **kw):
    return asyncio.run(router.generate(GenerateRequest(**{**KW, **kw})))


def test_disabled_policy_gives_the_uncached_pixels(router):
    plain = _run(router)
    off = _run(router, cache={"enabled": False, "preset": "ultra"})
    assert np.array_equal(off.images[0].pixels, plain.images[0].pixels)
    assert plain.cache_stats is None and off.cache_stats is None


def test_presets_skip_steps_at_12_steps_and_report_them(router):
    plain = _run(router).images[0].pixels.astype(int)
    cached = {}
    for preset in ("slow", "medium", "fast", "ultra"):
        result = _run(router, cache={"preset": preset})
        stats = result.cache_stats
        assert stats.computed_steps + stats.cached_steps == 12 and stats.cached_steps >= 1
        cached[preset] = stats.cached_steps
        assert not np.array_equal(result.images[0].pixels, plain)  # steps really were skipped
    assert cached["slow"] <= cached["medium"] <= cached["fast"] <= cached["ultra"]


def test_concurrent_requests_with_different_policies_do_not_interfere(router):
    alone = {p: _run(router, cache={"preset": p}) for p in ("fast", "slow")}

    async def both():
        return await asyncio.gather(*(router.generate(GenerateRequest(**KW, cache={"preset": p}))
                                      for p in ("fast", "slow")))

    together = dict(zip(("fast", "slow"), asyncio.run(both())))
    for preset, result in together.items():
        assert result.batch_size == 1  # different policies never share a batch
        assert np.array_equal(result.images[0].pixels, alone[preset].images[0].pixels)
        assert result.cache_stats == alone[preset].cache_stats


def test_server_default_policy_applies_to_requests_without_one(flux_dev_dir):
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"),
                                     RouterConfig(cache={"preset": "fast"}))
    assert _run(router).cache_stats.cached_steps >= 1
    assert _run(router, cache={"enabled": False}).cache_stats is None


@pytest.mark.parametrize("cache", [{"preset": "warp"}, {"Fn_compute_blocks": 0}, {"taylorseer_order": 9},
                                   {"unknown": 1}])
def test_bad_policies_are_request_errors(cache):
    from services.runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="cache"):
        GenerateRequest.parse(prompt="x", cache=cache)
