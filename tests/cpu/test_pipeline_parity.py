"""End to end: ditserve's stages (in-process) give diffusers' FluxPipeline pixels."""

import asyncio

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from services.cli import build_in_process_router
from services.runtime.config import GenerateRequest, StageConfig


class _SyncRouter:
    def __init__(self, router):
        self.router = router

    def generate(self, request):
        return asyncio.run(self.router.generate(request))


def _router(path) -> _SyncRouter:
    return _SyncRouter(build_in_process_router(StageConfig(model_path=path, device="cpu", dtype="float32")))


@pytest.fixture(scope="module")
def dev(flux_dev_dir):
    return _router(flux_dev_dir), FluxPipeline.from_pretrained(flux_dev_dir)


def _diffusers_pixels(pipe, seeds, **kwargs) -> np.ndarray:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(num_images_per_prompt=len(seeds), generator=generators, output_type="np", **kwargs).images
    return (out * 255).round().astype("uint8")


def _assert_same_pixels(result, expected: np.ndarray):
    got = np.stack([img.pixels for img in result.images])
    _assert_equal_up_to_rounding(got, expected)


def _assert_equal_up_to_rounding(got: np.ndarray, expected: np.ndarray):
    assert got.shape == expected.shape
    assert expected.std() > 5, "image is flat; the comparison would prove nothing"
    diff = np.abs(got.astype(int) - expected.astype(int))
    # Identical up to 8-bit rounding: a value sitting on a .5 boundary may round either way.
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    assert (diff > 0).mean() < 0.01


@pytest.mark.parametrize(
    "height,width,seed",
    [(64, 64, 0), (48, 80, 1234), (96, 32, 2**40 + 7)],
)
def test_text_to_image_matches_diffusers(dev, height, width, seed):
    router, pipe = dev
    prompt = "a red circle on a white background"
    result = router.generate(
        GenerateRequest(prompt=prompt, height=height, width=width, num_inference_steps=4, guidance_scale=3.5, seed=seed)
    )
    expected = _diffusers_pixels(
        pipe, [seed], prompt=prompt, height=height, width=width, num_inference_steps=4, guidance_scale=3.5
    )
    _assert_same_pixels(result, expected)
    assert result.images[0].seed == seed


def test_true_cfg_and_several_images_match_diffusers(dev):
    router, pipe = dev
    kwargs = dict(prompt="a blue square", negative_prompt="a dark night", true_cfg_scale=4.0, height=48, width=64)
    result = router.generate(GenerateRequest(num_inference_steps=3, guidance_scale=2.0, seed=7, n=2, **kwargs))
    expected = _diffusers_pixels(pipe, [7, 8], num_inference_steps=3, guidance_scale=2.0, **kwargs)
    _assert_same_pixels(result, expected)
    assert [img.seed for img in result.images] == [7, 8]


def test_max_sequence_length_matches_diffusers(dev):
    router, pipe = dev
    kwargs = dict(prompt="a green triangle in the sky", height=32, width=32, num_inference_steps=2)
    result = router.generate(GenerateRequest(max_sequence_length=24, seed=3, **kwargs))
    expected = _diffusers_pixels(pipe, [3], max_sequence_length=24, **kwargs)
    _assert_same_pixels(result, expected)


def test_schnell_matches_diffusers(flux_schnell_dir):
    router, pipe = _router(flux_schnell_dir), FluxPipeline.from_pretrained(flux_schnell_dir)
    kwargs = dict(prompt="a yellow star", height=64, width=48, num_inference_steps=4, max_sequence_length=256)
    result = router.generate(GenerateRequest(seed=11, guidance_scale=0.0, **kwargs))
    expected = _diffusers_pixels(pipe, [11], guidance_scale=0.0, **kwargs)
    _assert_same_pixels(result, expected)


def test_same_seed_same_image_alone_or_in_a_batch(dev):
    router, _ = dev
    base = dict(prompt="a cat", height=32, width=32, num_inference_steps=2)
    batch = router.generate(GenerateRequest(seed=100, n=3, **base))
    alone = router.generate(GenerateRequest(seed=101, **base))
    # Different batch sizes may take different CPU matmul kernels, so equality is up to the
    # same 8-bit rounding as against diffusers, not bitwise.
    _assert_equal_up_to_rounding(batch.images[1].pixels, alone.images[0].pixels)


def test_defaults_come_from_the_model(dev, flux_schnell_dir):
    router, _ = dev
    result = router.generate(GenerateRequest(prompt="a dog", height=32, width=32, seed=0))
    assert result.request.num_inference_steps == 28
    assert result.request.guidance_scale == 3.5
    assert result.request.max_sequence_length == 512
    assert result.stages.keys() == {"encoder", "denoiser", "vae"}
    assert all(m.seconds > 0 and m.peak_memory_bytes > 0 for m in result.stages.values())
