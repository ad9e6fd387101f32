"""Native Wan 2.1 text-to-video: whole requests through ditserve's stages against diffusers'
WanPipeline on the same tiny directory and seed (same frames), with its FlowMatch and its UniPC
scheduler, CFG against "" and against a negative prompt, several videos, and parallel replicas;
the Wan variants the native family lacks go to the diffusers backend."""

import json

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from services.cli import build_in_process_router
from services.runtime.config import StageConfig
from services.runtime.errors import UnsupportedModelError
from services.runtime.registry import resolve
from tests import family_checks as fc
from tests.tiny_families import build_tiny_wan, build_tiny_wan_i2v

FRAMES = dict(width=48, height=32, num_frames=9, num_inference_steps=3)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "model")


@pytest.fixture(scope="module")
def wan_unipc_dir(tmp_path_factory):
    """The same model with the scheduler Wan's checkpoints ship: UniPC, flow prediction."""
    path = build_tiny_wan(tmp_path_factory.mktemp("wan-unipc") / "model")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def _frames(router, **fields) -> np.ndarray:
    return fc.pixels(fc.generate(router, **{**FRAMES, **fields}))


def _diffusers(path, prompt, seeds, **kwargs) -> np.ndarray:
    pipe = WanPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=prompt, num_videos_per_prompt=len(seeds), output_type="np",
               generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **{**FRAMES, **kwargs}).frames
    return (out * 255).round().astype(int)


@pytest.mark.parametrize("fields", [dict(), dict(guidance_scale=1.0), dict(negative_prompt="dark and blurry")],
                         ids=["cfg-against-empty", "no-cfg", "negative-prompt"])
def test_frames_match_wan_pipeline(wan_dir, fields):
    router = fc.router(wan_dir)
    assert router.spec.family == "wan" and not router.spec.whole_pipeline
    got = _frames(router, prompt="a red circle", seed=5, **fields)
    fc.assert_same(got, _diffusers(wan_dir, "a red circle", [5], **fields))


def test_unipc_scheduler_and_several_videos_match(wan_unipc_dir):
    router = fc.router(wan_unipc_dir)
    got = _frames(router, prompt="a blue square", seed=3, n=2)
    fc.assert_same(got, _diffusers(wan_unipc_dir, "a blue square", [3, 4]))
    assert np.abs(got[0] - got[1]).max() > 10  # seeds 3 and 4
    # the multistep solver's history is the request's own: the same request again, the same frames
    np.testing.assert_array_equal(_frames(router, prompt="a blue square", seed=3, n=2), got)


@pytest.mark.parametrize("parallel", [dict(ulysses_degree=2), dict(cfg_parallel=True), dict(ring_degree=2)],
                         ids=["ulysses2", "cfg2", "ring2"])
def test_parallel_replicas_give_single_rank_frames(wan_dir, parallel):
    # 3 latent frames x 2 x 3 patches = 18 video tokens; heads 2. The prompt is not sharded:
    # every rank cross-attends to all of it.
    fc.check_parallel_replica(wan_dir, parallel, prompt="a red circle", negative_prompt="dark", seed=5, **FRAMES)


def test_wan22_two_experts_switch_at_the_boundary(tmp_path):
    """Wan 2.2 A14B's layout: transformer until t < boundary_ratio x 1000, transformer_2 after,
    both in the one replica; the frames equal WanPipeline's."""
    path = build_tiny_wan(tmp_path / "a14b", two_experts=True)
    router = fc.router(path)
    assert router.spec.family == "wan" and router.denoiser.stage.expert_2 is not None
    # 4 steps with shift 7: the first two timesteps lie above 875, so both experts run
    got = _frames(router, prompt="a red circle", seed=2, num_frames=5, num_inference_steps=4)
    fc.assert_same(got, _diffusers(path, "a red circle", [2], num_frames=5, num_inference_steps=4))
    # a second request starts on the first expert again
    np.testing.assert_array_equal(_frames(router, prompt="a red circle", seed=2, num_frames=5,
                                          num_inference_steps=4), got)
    only_first = fc.router(path)
    only_first.denoiser.stage.boundary_timestep = 0.0  # every step on the high-noise expert
    assert np.abs(_frames(only_first, prompt="a red circle", seed=2, num_frames=5, num_inference_steps=4)
                  - got).max() > 4


def test_variants_without_a_native_path_go_to_the_diffusers_backend(tmp_path):
    i2v = build_tiny_wan_i2v(tmp_path / "i2v")
    assert resolve(i2v)[1].family == "wan_i2v"
    config = json.loads((i2v / "transformer" / "config.json").read_text())  # first-last-frame's DiT
    (i2v / "transformer" / "config.json").write_text(json.dumps({**config, "pos_embed_seq_len": 10}))
    assert resolve(i2v)[1].family == "diffusers:WanImageToVideoPipeline"
    with pytest.raises(UnsupportedModelError, match="first-last-frame"):
        resolve(i2v, "native")
    i2v_ti2v = build_tiny_wan_i2v(tmp_path / "i2v-expand")  # per-token timesteps with I2V's 36 channels
    index = json.loads((i2v_ti2v / "model_index.json").read_text())
    (i2v_ti2v / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    assert resolve(i2v_ti2v)[1].family == "diffusers:WanImageToVideoPipeline"
    with pytest.raises(UnsupportedModelError, match="per-token timesteps"):
        resolve(i2v_ti2v, "native")


def test_defaults(wan_dir):
    model, spec = resolve(wan_dir)
    d = spec.defaults(model)
    assert (d.num_inference_steps, d.guidance_scale, d.width, d.height, d.num_frames, d.fps) == (50, 5.0, 832, 480,
                                                                                                    81, 16)


def test_bf16_frames_are_the_pipelines(wan_dir):
    """In bf16 as WanPipeline runs it: noise drawn in fp32, the branches combined in bf16, the
    scheduler's t handed over uncast, the time embedder and norms kept in fp32 (diffusers'
    _keep_in_fp32_modules), each prompt encoded on its own."""
    router = build_in_process_router(StageConfig(model_path=wan_dir, device="cpu", dtype="bfloat16"))
    pipe = WanPipeline.from_pretrained(wan_dir, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    for fields in (dict(), dict(negative_prompt="dark")):
        got = _frames(router, prompt="a red circle", seed=5, **fields)
        expected = pipe(prompt="a red circle", generator=[torch.Generator("cpu").manual_seed(5)], output_type="np",
                        **FRAMES, **fields).frames
        fc.assert_same(got, (expected * 255).round().astype(int))
