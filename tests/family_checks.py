"""What every native family's tests do the same way: run whole requests through ditserve's stages
in-process, run the family's diffusers pipeline on the same directory and seeds, and compare
pixels; plus the checks that read the same for every family (parallel replicas, per-request
LoRA, per-request cache). Family files keep only what is their own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch

from services.cli import build_in_process_router
from services.runtime.config import GenerateRequest, StageConfig
from services.runtime.registry import ModelDir


def router(path, **denoiser_options):
    return build_in_process_router(StageConfig(model_path=path, device="cpu", dtype="float32"),
                                   denoiser_options=denoiser_options or None)


def generate(r, **fields):
    return asyncio.run(r.generate(GenerateRequest(**fields)))


def pixels(result) -> np.ndarray:
    """A result's images (or videos' frames) as one int array, [n, (F,) H, W, 3]."""
    return np.stack([img.pixels for img in result.images]).astype(int)


def diffusers_pixels(pipe, seeds, **kwargs) -> np.ndarray:
    """The pipeline's images for `seeds` (one CPU generator each, as ditserve draws them)."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(num_images_per_prompt=len(seeds), generator=generators, output_type="np", **kwargs).images
    return (out * 255).round().astype(int)


def assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    """Identical up to 8-bit rounding: a value on a .5 boundary may round either way."""
    assert got.shape == expected.shape and expected.std() > 5, "flat output: the comparison would prove nothing"
    diff = np.abs(got - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"max {diff.max()}, {(diff > 0).mean():.3%} differ"


def check_parallel_replica(path, parallel: dict, **request) -> None:
    """A replica over several CPU ranks gives the single-rank pixels (up to 8-bit rounding: shards
    change GEMM shapes and reduction orders, never more)."""
    expected = pixels(generate(router(path), **request))
    r = router(path, **parallel)
    try:
        diff = np.abs(pixels(generate(r, **request)) - expected)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    finally:
        r.denoiser.stage.close()


def write_block_lora(path: Path, model_dir, family: str, roots: tuple[str, ...]) -> Path:
    """A diffusers-layout LoRA (rank 4, no alphas) on every linear of the native DiT whose path
    starts with one of `roots`."""
    from safetensors.torch import save_file

    from services.denoiser.lora.formats import module_shapes
    from services.denoiser.models import FAMILIES

    fam = FAMILIES[family]
    config = fam.config_cls.from_dict(ModelDir(model_dir).component_config("transformer"))
    g = torch.Generator().manual_seed(0)
    state = {}
    for module, (n_out, n_in) in module_shapes(fam.model_cls, config).items():
        if module.startswith(roots):
            state[f"transformer.{module}.lora_A.weight"] = torch.randn(4, n_in, generator=g) * 0.3
            state[f"transformer.{module}.lora_B.weight"] = torch.randn(n_out, 4, generator=g) * 0.3
    save_file(state, str(path))
    return path


def check_lora_against_diffusers(model_dir, pipe, lora_path: Path, **request) -> None:
    """ditserve's per-request adapter at strength 0.7 gives the pixels of diffusers'
    load_lora_weights + set_adapters(0.7), and changes the image."""
    r = router(model_dir)
    seed = request.pop("seed", 3)
    result = generate(r, seed=seed, lora=[{"name": "style", "path": str(lora_path), "strength": 0.7}], **request)
    pipe.load_lora_weights(str(lora_path), adapter_name="style")
    try:
        pipe.set_adapters(["style"], adapter_weights=[0.7])
        expected = diffusers_pixels(pipe, [seed], **request)
    finally:
        pipe.delete_adapters("style")
    assert_same(pixels(result), expected)
    assert np.abs(pixels(result) - pixels(generate(r, seed=seed, **request))).max() > 4


def check_per_request_cache(model_dir, **request) -> None:
    """Cache disabled gives the uncached pixels exactly; the fast preset skips steps (12 here)."""
    r = router(model_dir)
    request = dict(prompt="a red circle", height=32, width=32, num_inference_steps=12, seed=2, **request)
    plain = generate(r, **request)
    np.testing.assert_array_equal(pixels(generate(r, cache={"enabled": False}, **request)), pixels(plain))
    stats = generate(r, cache={"preset": "fast"}, **request).cache_stats
    assert stats.cached_steps > 0 and stats.computed_steps + stats.cached_steps == 12
