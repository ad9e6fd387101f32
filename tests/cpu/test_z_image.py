"""Native Z-Image, whole requests through ditserve's stages against diffusers' ZImagePipeline on
the same directory and seed (same pixels): without CFG (Turbo's guidance 0), with CFG against a
negative prompt or the default "", in bf16, batched, on parallel replicas, with a LoRA and the
cache.
The DiT module itself is tested in test_z_image_module.py."""

import asyncio

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline

from services.cli import build_in_process_router
from services.runtime.config import GenerateRequest, StageConfig
from services.runtime.errors import InvalidRequestError
from services.runtime.registry import resolve
from tests import family_checks as fc


@pytest.fixture(scope="module")
def pipe(z_image_dir):
    pipe = ZImagePipeline.from_pretrained(z_image_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The tiny VAE's factor is 8: 48x80 -> 3x5 = 15 image tokens, 112x160 -> 70 (3 blocks of 32 pads).
@pytest.mark.parametrize("height,width,seed", [(64, 64, 0), (48, 80, 1234), (112, 160, 5)])
def test_text_to_image_without_cfg_matches_diffusers(z_image_dir, pipe, height, width, seed):
    kwargs = dict(prompt="a red circle on a white background", height=height, width=width, num_inference_steps=4,
                  guidance_scale=0.0)
    result = fc.generate(fc.router(z_image_dir), seed=seed, **kwargs)
    fc.assert_same(fc.pixels(result), fc.diffusers_pixels(pipe, [seed], **kwargs))


def test_cfg_with_negative_prompt_and_several_images_matches_diffusers(z_image_dir, pipe):
    router = fc.router(z_image_dir)
    kwargs = dict(prompt="a blue square", negative_prompt="a dark night with many stars", guidance_scale=4.0,
                  height=48, width=80, num_inference_steps=3)
    result = fc.generate(router, seed=7, n=2, **kwargs)
    fc.assert_same(fc.pixels(result), fc.diffusers_pixels(pipe, [7, 8], **kwargs))
    against_empty = fc.generate(router, seed=7, **{**kwargs, "negative_prompt": None})
    fc.assert_same(fc.pixels(against_empty), fc.diffusers_pixels(pipe, [7], **{**kwargs, "negative_prompt": None}))
    assert np.abs(fc.pixels(against_empty)[0] - fc.pixels(result)[0]).max() > 4, "the negative prompt changed nothing"


def test_bf16_keeps_the_pipelines_fp32_latents(z_image_dir):
    """ZImagePipeline keeps noise, CFG and the Euler steps in fp32 around a bf16 DiT; so does the
    native path (spec.fp32_latents), hence the same bf16 pixels."""
    kwargs = dict(prompt="a blue square", negative_prompt="dark", guidance_scale=4.0, height=48, width=80,
                  num_inference_steps=4)
    router = build_in_process_router(StageConfig(model_path=z_image_dir, device="cpu", dtype="bfloat16"))
    pipe = ZImagePipeline.from_pretrained(z_image_dir, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    fc.assert_same(fc.pixels(fc.generate(router, seed=3, **kwargs)), fc.diffusers_pixels(pipe, [3], **kwargs))


# With 4 steps (1000 - t) / 1000 is 0, 0.1, 0.25, 0.5: truncation 0.2 runs the last two without CFG.
@pytest.mark.parametrize("options", [dict(cfg_normalization=0.8), dict(cfg_truncation=0.2)],
                         ids=["normalization", "truncation"])
def test_cfg_normalization_and_truncation_per_request(z_image_dir, pipe, options):
    """ZImagePipeline's cfg_normalization / cfg_truncation, as request fields; other families
    refuse them with a 400."""
    kwargs = dict(prompt="a blue square", negative_prompt="dark", guidance_scale=6.0, height=48, width=64,
                  num_inference_steps=4)
    router = fc.router(z_image_dir)
    plain = fc.pixels(fc.generate(router, seed=4, **kwargs))
    result = fc.pixels(fc.generate(router, seed=4, **options, **kwargs))
    fc.assert_same(result, fc.diffusers_pixels(pipe, [4], **options, **kwargs))
    assert np.abs(result - plain).max() > 4, f"{options} changed nothing"


def test_cfg_limits_are_refused_where_the_pipeline_has_none(qwen_image_dir):
    with pytest.raises(InvalidRequestError, match="cfg_truncation is not available for qwen_image") as err:
        fc.generate(fc.router(qwen_image_dir), prompt="x", cfg_truncation=0.5)
    assert err.value.param == "cfg_truncation"


def test_batched_prompts_of_different_lengths_equal_each_alone(z_image_dir):
    """Two requests in one router batch, prompts and negative prompts of different token counts
    (one against the default ""): each image is the one its request gets alone."""
    router = fc.router(z_image_dir)
    requests = [dict(prompt="a cat", seed=1),
                dict(prompt="a large green triangle on a yellow background", negative_prompt="blurry", seed=2)]
    common = dict(height=48, width=80, num_inference_steps=2, guidance_scale=3.0)
    alone = [fc.pixels(fc.generate(router, **r, **common)) for r in requests]

    async def together():
        return await asyncio.gather(*(router.generate(GenerateRequest(**r, **common)) for r in requests))

    results = asyncio.run(together())
    assert results[0].stages["encoder"] is results[1].stages["encoder"]  # one batch, one encoder call
    for result, want in zip(results, alone):
        np.testing.assert_array_equal(fc.pixels(result), want)


def test_defaults_and_limits(z_image_dir, pipe):
    model, spec = resolve(z_image_dir)
    assert spec.family == "z_image" and not spec.whole_pipeline
    defaults = spec.defaults(model)
    # ZImagePipeline's: 50 steps, guidance 5 (CFG against ""), 1024 x 1024, 512 tokens, except
    # that the tiny DiT's caption RoPE table (axes_lens[0] = 256) holds 224 padded tokens at most
    assert (defaults.num_inference_steps, defaults.guidance_scale, defaults.height, defaults.width,
            defaults.max_sequence_length, defaults.text_limit) == (50, 5.0, 1024, 1024, 224, 224)
    router = fc.router(z_image_dir)
    # (the tiny DiT's RoPE tables stop at 64 latent rows, so the size and steps are given)
    kwargs = dict(prompt="a red circle", height=32, width=48, num_inference_steps=3)
    fc.assert_same(fc.pixels(fc.generate(router, seed=9, **kwargs)), fc.diffusers_pixels(pipe, [9], **kwargs))
    with pytest.raises(InvalidRequestError, match="max_sequence_length 256 exceeds 224 for z_image"):
        fc.generate(router, prompt="x", max_sequence_length=256)
    with pytest.raises(InvalidRequestError, match="guidance_scale") as err:
        fc.generate(router, prompt="x", true_cfg_scale=4.0)
    assert err.value.param == "true_cfg_scale"


@pytest.mark.parametrize("parallel", [dict(ulysses_degree=2), dict(cfg_parallel=True), dict(ring_degree=2)],
                         ids=["ulysses2", "cfg2", "ring2"])
def test_parallel_replicas_give_single_rank_pixels(z_image_dir, parallel):
    # 48x80 -> 15 image tokens, padded to 32; the prompts' lengths differ and do not divide by 2.
    fc.check_parallel_replica(z_image_dir, parallel, prompt="a red circle", negative_prompt="dark",
                              guidance_scale=3.0, height=48, width=80, num_inference_steps=2, seed=5)


# --- per-request LoRA and cache ----------------------------------------------------------------


def test_per_request_lora_matches_diffusers(z_image_dir, pipe, tmp_path):
    """A diffusers-layout LoRA on every block linear (refiners included), at strength 0.7."""
    lora = fc.write_block_lora(tmp_path / "style.safetensors", z_image_dir, "z_image",
                               ("layers.", "noise_refiner.", "context_refiner."))
    fc.check_lora_against_diffusers(z_image_dir, pipe, lora, prompt="a red circle", height=32, width=48,
                                    num_inference_steps=2, guidance_scale=0.0)


def test_per_request_cache(z_image_dir):
    fc.check_per_request_cache(z_image_dir, guidance_scale=0.0)
