"""Native Flux.2 [klein], whole requests through ditserve's stages against diffusers'
Flux2KleinPipeline on the same directory and seed (same pixels): without and with CFG (always
against "", the pipeline takes no negative prompt), several images, non-square sizes, the
step-distilled variant (no CFG whatever the scale), warm-up, parallel replicas, a LoRA and the
cache. The DiT module itself is tested in test_flux2_module.py."""

import asyncio

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline

from services.cli import build_in_process_router
from services.runtime.config import GenerateRequest, StageConfig
from services.runtime.errors import InvalidRequestError
from services.runtime.registry import ModelDir, resolve
from tests.tiny_families import build_tiny_flux2_klein


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    return build_tiny_flux2_klein(tmp_path_factory.mktemp("flux2-klein") / "model")


@pytest.fixture(scope="module")
def distilled_dir(tmp_path_factory):
    """The same weights with the step-distilled variant's pipeline flag."""
    return build_tiny_flux2_klein(tmp_path_factory.mktemp("flux2-klein-distilled") / "model", is_distilled=True)


@pytest.fixture(scope="module")
def pipe(klein_dir):
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _router(path, **denoiser_options):
    return build_in_process_router(StageConfig(model_path=path, device="cpu", dtype="float32"),
                                   denoiser_options=denoiser_options or None)


def _generate(router, **fields):
    return asyncio.run(router.generate(GenerateRequest(**fields)))


def _pixels(result) -> np.ndarray:
    return np.stack([img.pixels for img in result.images]).astype(int)


def _diffusers(pipe, seeds, **kwargs) -> np.ndarray:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(num_images_per_prompt=len(seeds), generator=generators, output_type="np", **kwargs).images
    return (out * 255).round().astype(int)


def _assert_same(got: np.ndarray, expected: np.ndarray):
    assert got.shape == expected.shape and expected.std() > 5
    diff = np.abs(got - expected)
    # Identical up to 8-bit rounding: a value on a .5 boundary may round either way.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"max {diff.max()}, {(diff > 0).mean():.3%} differ"


def test_prompt_embeddings_are_the_pipelines(klein_dir, pipe):
    """Layers 9 / 18 / 27 of Qwen3 per token, all 512 padded tokens, no lengths."""
    from services.encoder.stage import EncoderStage
    from services.runtime.messages import EncodeRequest

    encoder = EncoderStage(StageConfig(model_path=klein_dir, device="cpu", dtype="float32"))
    out = encoder.encode(EncodeRequest(["a red circle", "", "a red circle"], 512))
    assert out.prompt_lengths is None and out.prompt_embeds.shape == (3, 512, 48)
    for i, prompt in enumerate(["a red circle", "", "a red circle"]):
        expected, _ = pipe.encode_prompt(prompt, device=torch.device("cpu"))
        torch.testing.assert_close(out.prompt_embeds[i : i + 1], expected, rtol=0, atol=0)


# The tiny VAE's factor is 8 and latents come in 2x2 patches: 48x80 -> a 3x5 token grid.
@pytest.mark.parametrize("height,width,seed", [(64, 64, 0), (48, 80, 1234), (96, 32, 5)])
def test_text_to_image_without_cfg_matches_diffusers(klein_dir, pipe, height, width, seed):
    kwargs = dict(prompt="a red circle on a white background", height=height, width=width, num_inference_steps=4,
                  guidance_scale=1.0)
    result = _generate(_router(klein_dir), seed=seed, **kwargs)
    assert result.images[0].pixels.shape == (height, width, 3)
    _assert_same(_pixels(result), _diffusers(pipe, [seed], **kwargs))


def test_cfg_and_several_images_match_diffusers(klein_dir, pipe):
    router = _router(klein_dir)
    kwargs = dict(prompt="a blue square", guidance_scale=4.0, height=48, width=80, num_inference_steps=3)
    result = _generate(router, seed=7, n=2, **kwargs)
    _assert_same(_pixels(result), _diffusers(pipe, [7, 8], **kwargs))
    assert np.abs(_pixels(result)[0] - _pixels(result)[1]).max() > 4  # seeds 7 and 8
    plain = _generate(router, seed=7, **{**kwargs, "guidance_scale": 1.0})
    assert np.abs(_pixels(plain)[0] - _pixels(result)[0]).max() > 4, "CFG changed nothing"


def test_distilled_checkpoint_runs_no_cfg(distilled_dir, klein_dir):
    """is_distilled: the pipeline ignores the guidance scale; so does ditserve (one branch)."""
    model, spec = resolve(distilled_dir)
    defaults = spec.defaults(model)
    assert (defaults.num_inference_steps, defaults.guidance_scale) == (4, 1.0)  # the model cards'
    pipe = Flux2KleinPipeline.from_pretrained(distilled_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a blue square", guidance_scale=4.0, height=48, width=80, num_inference_steps=3)
    router = _router(distilled_dir)
    assert not router.resolve(GenerateRequest(**kwargs)).cfg
    result = _pixels(_generate(router, seed=7, **kwargs))
    _assert_same(result, _diffusers(pipe, [7], **kwargs))
    np.testing.assert_array_equal(result, _pixels(_generate(_router(klein_dir), seed=7,
                                                            **{**kwargs, "guidance_scale": 1.0})))


def test_batched_prompts_equal_each_alone(klein_dir):
    """Two requests in one router batch: one encoder call, one denoiser batch (every row has the
    same 512 tokens), and each image is the one its request gets alone."""
    router = _router(klein_dir)
    requests = [dict(prompt="a cat", seed=1), dict(prompt="a large green triangle on a yellow background", seed=2)]
    common = dict(height=48, width=80, num_inference_steps=2, guidance_scale=3.0)
    alone = [_pixels(_generate(router, **r, **common)) for r in requests]

    async def together():
        return await asyncio.gather(*(router.generate(GenerateRequest(**r, **common)) for r in requests))

    results = asyncio.run(together())
    assert results[0].stages["denoiser"] is results[1].stages["denoiser"] and results[0].batch_size == 2
    for result, want in zip(results, alone):
        _assert_same(_pixels(result), want)


def test_defaults_limits_and_warm_up(klein_dir, pipe):
    model, spec = resolve(klein_dir)
    assert spec.family == "flux2_klein" and not spec.whole_pipeline
    defaults = spec.defaults(model)
    # Flux2KleinPipeline's: 50 steps, guidance 4 (CFG against ""), 128 x the VAE factor 8, 512 tokens
    assert (defaults.num_inference_steps, defaults.guidance_scale, defaults.height, defaults.width,
            defaults.max_sequence_length) == (50, 4.0, 1024, 1024, 512)
    # Warm-up of the denoiser and the VAE (its patchified latents) at the size asked next.
    router = _router(klein_dir, warmup_resolutions=["80x48"])
    kwargs = dict(prompt="a red circle", height=48, width=80, num_inference_steps=3)  # default guidance: CFG
    assert router.resolve(GenerateRequest(**kwargs)).negative_prompt == ""
    _assert_same(_pixels(_generate(router, seed=9, **kwargs)), _diffusers(pipe, [9], **kwargs))
    for fields, param in ((dict(negative_prompt="dark"), "negative_prompt"),
                          (dict(true_cfg_scale=4.0), "true_cfg_scale"),
                          (dict(max_sequence_length=1024), "max_sequence_length"), (dict(height=40), "height")):
        with pytest.raises(InvalidRequestError) as err:
            _generate(router, prompt="x", **fields)
        assert err.value.param == param


@pytest.mark.parametrize("parallel", [dict(ulysses_degree=2), dict(cfg_parallel=True), dict(ring_degree=2)],
                         ids=["ulysses2", "cfg2", "ring2"])
def test_parallel_replicas_give_single_rank_pixels(klein_dir, parallel):
    # 48x80 -> 15 image tokens (odd) after 512 text tokens; with CFG against "".
    kwargs = dict(prompt="a red circle", guidance_scale=3.0, height=48, width=80, num_inference_steps=2, seed=5)
    expected = _pixels(_generate(_router(klein_dir), **kwargs))
    router = _router(klein_dir, **parallel)
    try:
        diff = np.abs(_pixels(_generate(router, **kwargs)) - expected)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    finally:
        router.denoiser.stage.close()


# --- per-request LoRA and cache ----------------------------------------------------------------


def test_per_request_lora_matches_diffusers(klein_dir, pipe, tmp_path):
    """A diffusers-layout LoRA on every block linear (the fused single-block projections
    included), at strength 0.7: ditserve's per-request adapter gives the pixels of diffusers'
    load_lora_weights + set_adapters(0.7)."""
    from safetensors.torch import save_file

    from services.denoiser.lora.formats import module_shapes
    from services.denoiser.models.flux2 import Flux2Config, Flux2Transformer

    config = Flux2Config.from_dict(ModelDir(klein_dir).component_config("transformer"))
    g = torch.Generator().manual_seed(0)
    state = {}
    for module, (n_out, n_in) in module_shapes(Flux2Transformer, config).items():
        if module.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            state[f"transformer.{module}.lora_A.weight"] = torch.randn(4, n_in, generator=g) * 0.3
            state[f"transformer.{module}.lora_B.weight"] = torch.randn(n_out, 4, generator=g) * 0.3
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight" in state
    path = tmp_path / "style.safetensors"
    save_file(state, str(path))

    kwargs = dict(prompt="a red circle", height=32, width=48, num_inference_steps=2, guidance_scale=1.0)
    router = _router(klein_dir)
    result = _generate(router, seed=3, lora=[{"name": "style", "path": str(path), "strength": 0.7}], **kwargs)
    pipe.load_lora_weights(str(path), adapter_name="style")
    try:
        pipe.set_adapters(["style"], adapter_weights=[0.7])
        expected = _diffusers(pipe, [3], **kwargs)
    finally:
        pipe.delete_adapters("style")
    _assert_same(_pixels(result), expected)
    assert np.abs(_pixels(result) - _pixels(_generate(router, seed=3, **kwargs))).max() > 4


def test_per_request_cache(klein_dir):
    router = _router(klein_dir)
    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=12, guidance_scale=1.0, seed=2)
    plain = _generate(router, **kwargs)
    off = _generate(router, cache={"enabled": False}, **kwargs)
    np.testing.assert_array_equal(_pixels(off), _pixels(plain))
    fast = _generate(router, cache={"preset": "fast"}, **kwargs)
    stats = fast.cache_stats
    assert stats.cached_steps > 0 and stats.computed_steps + stats.cached_steps == 12
