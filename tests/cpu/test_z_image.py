"""Native Z-Image, whole requests through ditserve's stages against diffusers' ZImagePipeline on
the same directory and seed (same pixels): without CFG (Turbo's guidance 0), with CFG against a
negative prompt or the default "", in bf16, batched, on parallel replicas, with a LoRA and the
cache.
The DiT module itself is tested in test_z_image_module.py."""

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline

from services.cli import build_in_process_router
from services.runtime import registry
from services.runtime.config import GenerateRequest, StageConfig
from services.runtime.errors import InvalidRequestError
from services.runtime.registry import ModelDir, resolve


def _router(path, **denoiser_options):
    return build_in_process_router(StageConfig(model_path=path, device="cpu", dtype="float32"),
                                   denoiser_options=denoiser_options or None)


def _generate(router, **fields):
    return asyncio.run(router.generate(GenerateRequest(**fields)))


def _pixels(result) -> np.ndarray:
    return np.stack([img.pixels for img in result.images]).astype(int)


@pytest.fixture(scope="module")
def pipe(z_image_dir):
    pipe = ZImagePipeline.from_pretrained(z_image_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(pipe, seeds, **kwargs) -> np.ndarray:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(num_images_per_prompt=len(seeds), generator=generators, output_type="np", **kwargs).images
    return (out * 255).round().astype(int)


def _assert_same(got: np.ndarray, expected: np.ndarray):
    assert got.shape == expected.shape and expected.std() > 5
    diff = np.abs(got - expected)
    # Identical up to 8-bit rounding: a value on a .5 boundary may round either way.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"max {diff.max()}, {(diff > 0).mean():.3%} differ"


# The tiny VAE's factor is 8: 48x80 -> 3x5 = 15 image tokens, 112x160 -> 70 (3 blocks of 32 pads).
@pytest.mark.parametrize("height,width,seed", [(64, 64, 0), (48, 80, 1234), (112, 160, 5)])
def test_text_to_image_without_cfg_matches_diffusers(z_image_dir, pipe, height, width, seed):
    kwargs = dict(prompt="a red circle on a white background", height=height, width=width, num_inference_steps=4,
                  guidance_scale=0.0)
    result = _generate(_router(z_image_dir), seed=seed, **kwargs)
    _assert_same(_pixels(result), _diffusers(pipe, [seed], **kwargs))


def test_cfg_with_negative_prompt_and_several_images_matches_diffusers(z_image_dir, pipe):
    router = _router(z_image_dir)
    kwargs = dict(prompt="a blue square", negative_prompt="a dark night with many stars", guidance_scale=4.0,
                  height=48, width=80, num_inference_steps=3)
    result = _generate(router, seed=7, n=2, **kwargs)
    _assert_same(_pixels(result), _diffusers(pipe, [7, 8], **kwargs))
    against_empty = _generate(router, seed=7, **{**kwargs, "negative_prompt": None})
    _assert_same(_pixels(against_empty), _diffusers(pipe, [7], **{**kwargs, "negative_prompt": None}))
    assert np.abs(_pixels(against_empty)[0] - _pixels(result)[0]).max() > 4, "the negative prompt changed nothing"


def test_bf16_keeps_the_pipelines_fp32_latents(z_image_dir):
    """ZImagePipeline keeps noise, CFG and the Euler steps in fp32 around a bf16 DiT; so does the
    native path (spec.fp32_latents), hence the same bf16 pixels."""
    kwargs = dict(prompt="a blue square", negative_prompt="dark", guidance_scale=4.0, height=48, width=80,
                  num_inference_steps=4)
    router = build_in_process_router(StageConfig(model_path=z_image_dir, device="cpu", dtype="bfloat16"))
    pipe = ZImagePipeline.from_pretrained(z_image_dir, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    _assert_same(_pixels(_generate(router, seed=3, **kwargs)), _diffusers(pipe, [3], **kwargs))


# With 4 steps (1000 - t) / 1000 is 0, 0.1, 0.25, 0.5: truncation 0.2 runs the last two without CFG.
@pytest.mark.parametrize("options", [dict(cfg_normalization=0.8), dict(cfg_truncation=0.2)],
                         ids=["normalization", "truncation"])
def test_cfg_normalization_and_truncation_as_spec_defaults(z_image_dir, pipe, monkeypatch, options):
    """ZImagePipeline's cfg_normalization / cfg_truncation, set as the family's defaults."""
    spec = registry._SPECS_BY_CLASS["ZImagePipeline"]
    kwargs = dict(prompt="a blue square", negative_prompt="dark", guidance_scale=6.0, height=48, width=64,
                  num_inference_steps=4)
    plain = _pixels(_generate(_router(z_image_dir), seed=4, **kwargs))
    monkeypatch.setitem(registry._SPECS_BY_CLASS, "ZImagePipeline", dataclasses.replace(
        spec, defaults=lambda model: dataclasses.replace(spec.defaults(model), **options)))
    result = _pixels(_generate(_router(z_image_dir), seed=4, **kwargs))
    _assert_same(result, _diffusers(pipe, [4], **options, **kwargs))
    assert np.abs(result - plain).max() > 4, f"{options} changed nothing"


def test_batched_prompts_of_different_lengths_equal_each_alone(z_image_dir):
    """Two requests in one router batch, prompts and negative prompts of different token counts
    (one against the default ""): each image is the one its request gets alone."""
    router = _router(z_image_dir)
    requests = [dict(prompt="a cat", seed=1),
                dict(prompt="a large green triangle on a yellow background", negative_prompt="blurry", seed=2)]
    common = dict(height=48, width=80, num_inference_steps=2, guidance_scale=3.0)
    alone = [_pixels(_generate(router, **r, **common)) for r in requests]

    async def together():
        return await asyncio.gather(*(router.generate(GenerateRequest(**r, **common)) for r in requests))

    results = asyncio.run(together())
    assert results[0].stages["encoder"] is results[1].stages["encoder"]  # one batch, one encoder call
    for result, want in zip(results, alone):
        np.testing.assert_array_equal(_pixels(result), want)


def test_defaults_and_limits(z_image_dir, pipe):
    model, spec = resolve(z_image_dir)
    assert spec.family == "z_image" and not spec.whole_pipeline
    defaults = spec.defaults(model)
    # ZImagePipeline's: 50 steps, guidance 5 (CFG against ""), 1024 x 1024, 512 tokens, except
    # that the tiny DiT's caption RoPE table (axes_lens[0] = 256) holds 224 padded tokens at most
    assert (defaults.num_inference_steps, defaults.guidance_scale, defaults.height, defaults.width,
            defaults.max_sequence_length, defaults.text_limit) == (50, 5.0, 1024, 1024, 224, 224)
    router = _router(z_image_dir)
    # (the tiny DiT's RoPE tables stop at 64 latent rows, so the size and steps are given)
    kwargs = dict(prompt="a red circle", height=32, width=48, num_inference_steps=3)
    _assert_same(_pixels(_generate(router, seed=9, **kwargs)), _diffusers(pipe, [9], **kwargs))
    with pytest.raises(InvalidRequestError, match="max_sequence_length 256 exceeds 224 for z_image"):
        _generate(router, prompt="x", max_sequence_length=256)
    with pytest.raises(InvalidRequestError, match="guidance_scale") as err:
        _generate(router, prompt="x", true_cfg_scale=4.0)
    assert err.value.param == "true_cfg_scale"


@pytest.mark.parametrize("parallel", [dict(ulysses_degree=2), dict(cfg_parallel=True), dict(ring_degree=2)],
                         ids=["ulysses2", "cfg2", "ring2"])
def test_parallel_replicas_give_single_rank_pixels(z_image_dir, parallel):
    # 48x80 -> 15 image tokens, padded to 32; the prompts' lengths differ and do not divide by 2.
    kwargs = dict(prompt="a red circle", negative_prompt="dark", guidance_scale=3.0, height=48, width=80,
                  num_inference_steps=2, seed=5)
    expected = _pixels(_generate(_router(z_image_dir), **kwargs))
    router = _router(z_image_dir, **parallel)
    try:
        diff = np.abs(_pixels(_generate(router, **kwargs)) - expected)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    finally:
        router.denoiser.stage.close()


# --- per-request LoRA and cache ----------------------------------------------------------------


def test_per_request_lora_matches_diffusers(z_image_dir, pipe, tmp_path):
    """A diffusers-layout LoRA on every block linear (refiners included), at strength 0.7:
    ditserve's per-request adapter gives the pixels of load_lora_weights + set_adapters(0.7)."""
    from safetensors.torch import save_file

    from services.denoiser.lora.formats import module_shapes
    from services.denoiser.models.z_image import ZImageConfig, ZImageTransformer

    config = ZImageConfig.from_dict(ModelDir(z_image_dir).component_config("transformer"))
    g = torch.Generator().manual_seed(0)
    state = {}
    for module, (n_out, n_in) in module_shapes(ZImageTransformer, config).items():
        if module.startswith(("layers.", "noise_refiner.", "context_refiner.")):
            state[f"transformer.{module}.lora_A.weight"] = torch.randn(4, n_in, generator=g) * 0.3
            state[f"transformer.{module}.lora_B.weight"] = torch.randn(n_out, 4, generator=g) * 0.3
    path = tmp_path / "style.safetensors"
    save_file(state, str(path))

    kwargs = dict(prompt="a red circle", height=32, width=48, num_inference_steps=2, guidance_scale=0.0)
    router = _router(z_image_dir)
    result = _generate(router, seed=3, lora=[{"name": "style", "path": str(path), "strength": 0.7}], **kwargs)
    pipe.load_lora_weights(str(path), adapter_name="style")
    try:
        pipe.set_adapters(["style"], adapter_weights=[0.7])
        expected = _diffusers(pipe, [3], **kwargs)
    finally:
        pipe.delete_adapters("style")
    _assert_same(_pixels(result), expected)
    assert np.abs(_pixels(result) - _pixels(_generate(router, seed=3, **kwargs))).max() > 4


def test_per_request_cache(z_image_dir):
    router = _router(z_image_dir)
    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=12, guidance_scale=0.0, seed=2)
    plain = _generate(router, **kwargs)
    off = _generate(router, cache={"enabled": False}, **kwargs)
    np.testing.assert_array_equal(_pixels(off), _pixels(plain))
    fast = _generate(router, cache={"preset": "fast"}, **kwargs)
    stats = fast.cache_stats
    assert stats.cached_steps > 0 and stats.computed_steps + stats.cached_steps == 12
