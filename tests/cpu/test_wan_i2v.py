"""Native Wan image-to-video: the first frame through the VAE stage's encode (a black clip with
the frame first), its latents and mask joined to the noise's channels, and for Wan 2.1 I2V the
CLIP tokens of the encoder worker cross-attended next to the text; the same frames as
diffusers' WanImageToVideoPipeline on the same tiny directory and seed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from services.runtime.errors import InvalidRequestError
from tests import family_checks as fc
from tests.tiny_families import build_tiny_wan_i2v

FRAMES = dict(width=48, height=32, num_frames=9, num_inference_steps=2)


def _png(seed: int, width: int = 40, height: int = 30) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def wan21_i2v_dir(tmp_path_factory):
    return build_tiny_wan_i2v(tmp_path_factory.mktemp("wan21-i2v") / "model", clip=True)


def _diffusers(path, image: bytes, seeds, **kwargs) -> np.ndarray:
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=Image.open(io.BytesIO(image)).convert("RGB"), num_videos_per_prompt=len(seeds), output_type="np",
               generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **{**FRAMES, **kwargs}).frames
    return (out * 255).round().astype(int)


def test_wan21_i2v_with_clip_matches_diffusers(wan21_i2v_dir):
    router = fc.router(wan21_i2v_dir)
    assert router.spec.family == "wan_i2v" and router.encoder.stage.encoder.image_encoder is not None
    image = _png(1)
    got = fc.pixels(fc.generate(router, prompt="a red circle", seed=4, n=2, images=[image], **FRAMES))
    # (one diffusers call per seed: with num_videos_per_prompt > 1 the pipeline repeats the CLIP
    # tokens per prompt, not per video, and its transformer fails on the shapes)
    expected = np.concatenate([_diffusers(wan21_i2v_dir, image, [s], prompt="a red circle") for s in (4, 5)])
    fc.assert_same(got, expected)
    # the image conditions the video: another first frame, other frames
    other = fc.pixels(fc.generate(router, prompt="a red circle", seed=4, images=[_png(2)], **FRAMES))
    assert np.abs(other[0] - got[0]).max() > 10


def test_wan22_i2v_two_experts_match_diffusers(tmp_path):
    """Wan 2.2 I2V A14B's layout: no CLIP, the first frame only through the VAE's latents, two experts."""
    path = build_tiny_wan_i2v(tmp_path / "a14b-i2v", two_experts=True)
    router = fc.router(path)
    assert router.encoder.stage.encoder.image_encoder is None and router.denoiser.stage.expert_2 is not None
    image = _png(3, 64, 40)
    kwargs = dict(prompt="a blue square", negative_prompt="dark", num_frames=5, num_inference_steps=4)
    got = fc.pixels(fc.generate(router, seed=6, images=[image], **{**FRAMES, **kwargs}))
    fc.assert_same(got, _diffusers(path, image, [6], **kwargs))
    # the low-noise expert's own CFG scale (WanPipeline's guidance_scale_2)
    got = fc.pixels(fc.generate(router, seed=6, images=[image], guidance_scale_2=2.0, **{**FRAMES, **kwargs}))
    fc.assert_same(got, _diffusers(path, image, [6], guidance_scale_2=2.0, **kwargs))


@pytest.mark.parametrize("parallel", [dict(ulysses_degree=2), dict(cfg_parallel=True)], ids=["ulysses2", "cfg2"])
def test_parallel_replicas_give_single_rank_frames(wan21_i2v_dir, parallel):
    fc.check_parallel_replica(wan21_i2v_dir, parallel, prompt="a red circle", negative_prompt="dark", seed=5,
                              images=[_png(1)], **FRAMES)


def test_bad_input_is_refused(wan21_i2v_dir):
    router = fc.router(wan21_i2v_dir)
    with pytest.raises(InvalidRequestError, match="guidance_scale_2: wan_i2v has one expert"):
        fc.generate(router, prompt="x", images=[_png(1)], guidance_scale_2=3.0, **FRAMES)
    with pytest.raises(InvalidRequestError, match="needs an input image"):
        fc.generate(router, prompt="x", **FRAMES)
    with pytest.raises(InvalidRequestError, match="num_frames 8 does not fit"):
        fc.generate(router, prompt="x", images=[_png(1)], **{**FRAMES, "num_frames": 8})


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_wan22_ti2v_5b_layout_matches_diffusers(tmp_path, i2v):
    """Wan 2.2 TI2V-5B's layout: a timestep per token (0 on a given first frame), its 16x VAE;
    image-to-video replaces the first latent frame by the image's latents."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    from tests.tiny_families import build_tiny_wan_ti2v

    path = build_tiny_wan_ti2v(tmp_path / "ti2v", i2v=i2v)
    router = fc.router(path)
    assert router.spec.family == ("wan_i2v" if i2v else "wan") and router.denoiser.stage.expand_timesteps
    sizes = dict(width=96, height=64, num_frames=9, num_inference_steps=3)  # a 6 x 4 latent, 3 latent frames
    image = _png(7, 50, 30)
    got = fc.pixels(fc.generate(router, prompt="a green field", seed=8, **sizes, **({"images": [image]} if i2v else {})))
    pipe = (WanImageToVideoPipeline if i2v else WanPipeline).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    extra = {"image": Image.open(io.BytesIO(image)).convert("RGB")} if i2v else {}
    out = pipe(prompt="a green field", generator=[torch.Generator("cpu").manual_seed(8)], output_type="np",
               **sizes, **extra).frames
    fc.assert_same(got, (out * 255).round().astype(int))
    if i2v:
        fc.check_parallel_replica(path, dict(ulysses_degree=2), prompt="a green field", seed=8, images=[image],
                                  **sizes)
