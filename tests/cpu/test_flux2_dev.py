"""Native Flux.2 [dev] (Flux2Pipeline): Mistral 3's layers 10 / 20 / 30 per token, the Flux.2 DiT
with its guidance embedding (guidance-distilled: no CFG), the batch-norm VAE; the same pixels as
diffusers' Flux2Pipeline on the same tiny directory and seed. The checkpoint's tokenizer is a
PixtralProcessor, whose class needs torchvision (not installed in CI): diffusers gets the
tokenizer inside it, which is what the processor delegates text-only chat messages to."""

from __future__ import annotations

import pytest
import torch

from services.runtime.errors import InvalidRequestError
from services.runtime.registry import resolve
from tests import family_checks as fc
from tests.tiny_families import build_tiny_flux2_dev


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory):
    return build_tiny_flux2_dev(tmp_path_factory.mktemp("flux2-dev") / "model")


@pytest.fixture(scope="module")
def pipe(dev_dir):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

    # Built from its parts: from_pretrained checks the tokenizer against PixtralProcessor, which
    # without torchvision is a placeholder, not a class.
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(dev_dir / "scheduler"),
        vae=AutoencoderKLFlux2.from_pretrained(dev_dir / "vae"),
        text_encoder=Mistral3ForConditionalGeneration.from_pretrained(dev_dir / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(dev_dir / "tokenizer"),
        transformer=Flux2Transformer2DModel.from_pretrained(dev_dir / "transformer"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompt_embeddings_are_the_pipelines(dev_dir, pipe):
    router = fc.router(dev_dir)
    assert router.spec.family == "flux2_dev"
    got, _, lengths = router.encoder.stage.encoder.encode(["a red fox in [IMG] snow", ""], 64)
    want = torch.cat([pipe.encode_prompt(p, max_sequence_length=64)[0] for p in ["a red fox in [IMG] snow", ""]])
    assert lengths is None and got.shape == want.shape == (2, 64, 48)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("height,width,guidance", [(64, 64, 4.0), (48, 80, 2.5)])
def test_images_match_diffusers(dev_dir, pipe, height, width, guidance):
    kwargs = dict(prompt="a red circle on a white background", height=height, width=width, num_inference_steps=3,
                  guidance_scale=guidance, max_sequence_length=64)
    result = fc.generate(fc.router(dev_dir), seed=5, n=2, **kwargs)
    fc.assert_same(fc.pixels(result), fc.diffusers_pixels(pipe, [5, 6], **kwargs))


def test_defaults_and_refusals(dev_dir):
    model, spec = resolve(dev_dir)
    d = spec.defaults(model)
    assert (d.num_inference_steps, d.guidance_scale, d.max_sequence_length) == (50, 4.0, 512)
    router = fc.router(dev_dir)
    with pytest.raises(InvalidRequestError, match="negative_prompt"):
        router.resolve(fc.GenerateRequest(prompt="x", negative_prompt="y"))
    with pytest.raises(InvalidRequestError, match="true_cfg_scale"):
        router.resolve(fc.GenerateRequest(prompt="x", true_cfg_scale=3.0))


@pytest.mark.parametrize("parallel", [dict(ulysses_degree=2), dict(ring_degree=2)], ids=["ulysses2", "ring2"])
def test_parallel_replicas_give_single_rank_pixels(dev_dir, parallel):
    fc.check_parallel_replica(dev_dir, parallel, prompt="a red circle", height=48, width=80, num_inference_steps=2,
                              max_sequence_length=64, seed=3)
