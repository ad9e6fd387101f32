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

from services.runtime.config import GenerateRequest, StageConfig
from services.runtime.errors import InvalidRequestError
from services.runtime.registry import resolve
from tests import family_checks as fc
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
    result = fc.generate(fc.router(klein_dir), seed=seed, **kwargs)
    assert result.images[0].pixels.shape == (height, width, 3)
    fc.assert_same(fc.pixels(result), fc.diffusers_pixels(pipe, [seed], **kwargs))


def test_cfg_and_several_images_match_diffusers(klein_dir, pipe):
    router = fc.router(klein_dir)
    kwargs = dict(prompt="a blue square", guidance_scale=4.0, height=48, width=80, num_inference_steps=3)
    result = fc.generate(router, seed=7, n=2, **kwargs)
    fc.assert_same(fc.pixels(result), fc.diffusers_pixels(pipe, [7, 8], **kwargs))
    assert np.abs(fc.pixels(result)[0] - fc.pixels(result)[1]).max() > 4  # seeds 7 and 8
    plain = fc.generate(router, seed=7, **{**kwargs, "guidance_scale": 1.0})
    assert np.abs(fc.pixels(plain)[0] - fc.pixels(result)[0]).max() > 4, "CFG changed nothing"


def test_distilled_checkpoint_runs_no_cfg(distilled_dir, klein_dir):
    """is_distilled: the pipeline ignores the guidance scale; so does ditserve (one branch)."""
    model, spec = resolve(distilled_dir)
    defaults = spec.defaults(model)
    assert (defaults.num_inference_steps, defaults.guidance_scale) == (4, 1.0)  # the model cards'
    pipe = Flux2KleinPipeline.from_pretrained(distilled_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a blue square", guidance_scale=4.0, height=48, width=80, num_inference_steps=3)
    router = fc.router(distilled_dir)
    assert not router.resolve(GenerateRequest(**kwargs)).cfg
    result = fc.pixels(fc.generate(router, seed=7, **kwargs))
    fc.assert_same(result, fc.diffusers_pixels(pipe, [7], **kwargs))
    np.testing.assert_array_equal(result, fc.pixels(fc.generate(fc.router(klein_dir), seed=7,
                                                            **{**kwargs, "guidance_scale": 1.0})))


def test_batched_prompts_equal_each_alone(klein_dir):
    """Two requests in one router batch: one encoder call, one denoiser batch (every row has the
    same 512 tokens), and each image is the one its request gets alone."""
    router = fc.router(klein_dir)
    requests = [dict(prompt="a cat", seed=1), dict(prompt="a large green triangle on a yellow background", seed=2)]
    common = dict(height=48, width=80, num_inference_steps=2, guidance_scale=3.0)
    alone = [fc.pixels(fc.generate(router, **r, **common)) for r in requests]

    async def together():
        return await asyncio.gather(*(router.generate(GenerateRequest(**r, **common)) for r in requests))

    results = asyncio.run(together())
    assert results[0].stages["denoiser"] is results[1].stages["denoiser"] and results[0].batch_size == 2
    for result, want in zip(results, alone):
        fc.assert_same(fc.pixels(result), want)


def test_defaults_limits_and_warm_up(klein_dir, pipe):
    model, spec = resolve(klein_dir)
    assert spec.family == "flux2_klein" and not spec.whole_pipeline
    defaults = spec.defaults(model)
    # Flux2KleinPipeline's: 50 steps, guidance 4 (CFG against ""), 128 x the VAE factor 8, 512 tokens
    assert (defaults.num_inference_steps, defaults.guidance_scale, defaults.height, defaults.width,
            defaults.max_sequence_length) == (50, 4.0, 1024, 1024, 512)
    # Warm-up of the denoiser and the VAE (its patchified latents) at the size asked next.
    router = fc.router(klein_dir, warmup_resolutions=["80x48"])
    kwargs = dict(prompt="a red circle", height=48, width=80, num_inference_steps=3)  # default guidance: CFG
    assert router.resolve(GenerateRequest(**kwargs)).negative_prompt == ""
    fc.assert_same(fc.pixels(fc.generate(router, seed=9, **kwargs)), fc.diffusers_pixels(pipe, [9], **kwargs))
    for fields, param in ((dict(negative_prompt="dark"), "negative_prompt"),
                          (dict(true_cfg_scale=4.0), "true_cfg_scale"),
                          (dict(max_sequence_length=1024), "max_sequence_length"), (dict(height=40), "height")):
        with pytest.raises(InvalidRequestError) as err:
            fc.generate(router, prompt="x", **fields)
        assert err.value.param == param


@pytest.mark.parametrize("parallel", [dict(ulysses_degree=2), dict(cfg_parallel=True), dict(ring_degree=2)],
                         ids=["ulysses2", "cfg2", "ring2"])
def test_parallel_replicas_give_single_rank_pixels(klein_dir, parallel):
    # 48x80 -> 15 image tokens (odd) after 512 text tokens; with CFG against "".
    fc.check_parallel_replica(klein_dir, parallel, prompt="a red circle", guidance_scale=3.0, height=48, width=80,
                              num_inference_steps=2, seed=5)


# --- per-request LoRA and cache ----------------------------------------------------------------


def test_per_request_lora_matches_diffusers(klein_dir, pipe, tmp_path):
    """A diffusers-layout LoRA on every block linear (the fused single-block projections
    included), at strength 0.7."""
    from safetensors import safe_open

    lora = fc.write_block_lora(tmp_path / "style.safetensors", klein_dir, "flux2",
                               ("transformer_blocks.", "single_transformer_blocks."))
    with safe_open(str(lora), framework="pt") as f:
        assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight" in f.keys()
    fc.check_lora_against_diffusers(klein_dir, pipe, lora, prompt="a red circle", height=32, width=48,
                                    num_inference_steps=2, guidance_scale=1.0)


def test_per_request_cache(klein_dir):
    fc.check_per_request_cache(klein_dir, guidance_scale=1.0)
