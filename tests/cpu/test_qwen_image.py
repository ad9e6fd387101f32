"""Native Qwen-Image: the DiT module against diffusers' QwenImageTransformer2DModel, and whole
requests through ditserve's stages against diffusers' QwenImagePipeline (same directory, same
seed, same pixels), alone, batched, and on parallel replicas."""

import asyncio
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

from services.denoiser.latents import CenteredLatents2x2
from services.denoiser.weights import load_native_transformer
from services.runtime.config import GenerateRequest
from services.runtime.errors import InvalidRequestError
from services.runtime.registry import ModelDir, resolve
from tests import family_checks as fc


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("h,w,text_len", [(8, 8, 5), (6, 10, 13), (14, 4, 1)])
def test_module_matches_diffusers_fp32(qwen_image_dir, h, w, text_len):
    ref = QwenImageTransformer2DModel.from_pretrained(qwen_image_dir / "transformer").eval()
    native = load_native_transformer(ModelDir(qwen_image_dir), "qwen_image", dtype=torch.float32,
                                     device=torch.device("cpu"))
    layout, cpu = CenteredLatents2x2(4, 8), torch.device("cpu")
    g = torch.Generator().manual_seed(h * w + text_len)
    x = torch.randn(2, (h // 2) * (w // 2), 16, generator=g)
    ctx = torch.randn(2, text_len, 16, generator=g)
    t = torch.rand(2, generator=g)
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_shapes=[[(1, h // 2, w // 2)]] * 2,
                       return_dict=False)[0]
        got = native(x, ctx, None, t, native.rope(layout.text_ids(text_len, cpu), layout.image_ids(h, w, cpu)))
    assert expected.std() > 0.1
    assert _rel_err(got, expected) <= 1e-5


def test_module_bf16_close_to_diffusers(qwen_image_dir):
    ref = QwenImageTransformer2DModel.from_pretrained(qwen_image_dir / "transformer", torch_dtype=torch.bfloat16)
    native = load_native_transformer(ModelDir(qwen_image_dir), "qwen_image", dtype=torch.bfloat16,
                                     device=torch.device("cpu"))
    layout, cpu = CenteredLatents2x2(4, 8), torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 12, 16, generator=g).bfloat16(), torch.randn(1, 9, 16, generator=g).bfloat16(), torch.rand(1)
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_shapes=[[(1, 3, 4)]],
                       return_dict=False)[0]
        got = native(x, ctx, None, t, native.rope(layout.text_ids(9, cpu), layout.image_ids(6, 8, cpu)))
    assert got.dtype == torch.bfloat16 and _rel_err(got.float(), expected.float()) <= 1e-2


# --- whole requests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(qwen_image_dir):
    return QwenImagePipeline.from_pretrained(qwen_image_dir)


@pytest.mark.parametrize("height,width,seed", [(64, 64, 0), (48, 80, 1234)])
def test_text_to_image_matches_diffusers(qwen_image_dir, pipe, height, width, seed):
    router = fc.router(qwen_image_dir)
    kwargs = dict(prompt="a red circle on a white background", height=height, width=width, num_inference_steps=4)
    result = fc.generate(router, seed=seed, **kwargs)
    fc.assert_same(fc.pixels(result), fc.diffusers_pixels(pipe, [seed], **kwargs))


def test_true_cfg_with_negative_prompt_and_several_images_match_diffusers(qwen_image_dir, pipe):
    kwargs = dict(prompt="a blue square", negative_prompt="a dark night with many stars", true_cfg_scale=4.0,
                  height=48, width=64, num_inference_steps=3)
    result = fc.generate(fc.router(qwen_image_dir), seed=7, n=2, **kwargs)
    fc.assert_same(fc.pixels(result), fc.diffusers_pixels(pipe, [7, 8], **kwargs))
    plain = fc.generate(fc.router(qwen_image_dir), seed=7, **{**kwargs, "negative_prompt": None})
    # (CFG's renormalisation keeps the change small on random weights, but it is there)
    assert np.abs(fc.pixels(plain)[0] - fc.pixels(result)[0]).max() > 4, "the negative prompt changed nothing"


def test_batched_prompts_of_different_lengths_equal_each_alone(qwen_image_dir):
    """Two requests in one router batch, prompts of different token counts: each image is the
    one its request gets alone (the DiT never sees padding)."""
    router = fc.router(qwen_image_dir)
    requests = [dict(prompt="a cat", seed=1), dict(prompt="a large green triangle on a yellow background", seed=2)]
    common = dict(height=32, width=32, num_inference_steps=2)
    alone = [fc.pixels(fc.generate(router, **r, **common)) for r in requests]

    async def together():
        return await asyncio.gather(*(router.generate(GenerateRequest(**r, **common)) for r in requests))

    for result, want in zip(asyncio.run(together()), alone):
        np.testing.assert_array_equal(fc.pixels(result), want)


def test_defaults_and_limits(qwen_image_dir):
    model, spec = resolve(qwen_image_dir)
    assert spec.family == "qwen_image" and not spec.whole_pipeline
    defaults = spec.defaults(model)
    # QwenImagePipeline's: 50 steps, true CFG 4, 128 x the VAE factor (4 for the tiny VAE), 512 tokens
    assert (defaults.num_inference_steps, defaults.true_cfg_scale, defaults.height, defaults.max_sequence_length) == (
        50, 4.0, 512, 512)
    router = fc.router(qwen_image_dir)
    with pytest.raises(InvalidRequestError, match="max_sequence_length"):
        fc.generate(router, prompt="x", max_sequence_length=2048)


@pytest.mark.parametrize("parallel", [dict(ulysses_degree=2), dict(cfg_parallel=True), dict(ring_degree=2),
                                      dict(cfg_parallel=True, ulysses_degree=2)],
                         ids=["ulysses2", "cfg2", "ring2", "cfg2xulysses2"])
def test_parallel_replicas_give_single_rank_pixels(qwen_image_dir, parallel):
    # 48x80 with the tiny VAE's factor 4 -> a 6x10 token grid; the 3 heads and the prompts' token
    # counts do not divide by 2, and the negative prompt's length differs from the positive's.
    fc.check_parallel_replica(qwen_image_dir, parallel, prompt="a red circle", negative_prompt="dark",
                              true_cfg_scale=3.0, height=48, width=80, num_inference_steps=2, seed=5)


def test_tensor_parallel_needs_whole_heads(qwen_image_dir):
    with pytest.raises(Exception, match="heads"):
        fc.router(qwen_image_dir, tp_size=2)  # 3 heads


@contextmanager
def _gloo(rank: int, port: int, world: int):
    """This process as rank `rank` of a gloo group of `world` (one CPU thread each)."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tiny_qwen(tp=None):
    """A 2-block, 4-head Qwen-Image DiT (seeded: every rank builds the same weights)."""
    from services.denoiser.models.qwen_image import QwenImageConfig, QwenImageTransformer

    config = QwenImageConfig(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                             num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    return QwenImageTransformer(config, tp=tp).eval()


def _tp_rank(rank: int, port: int):
    from services.denoiser.parallel.context import SequenceParallel
    from services.denoiser.parallel.mesh import ParallelDegrees, ParallelMesh
    from services.denoiser.parallel.tp import TensorParallel, shard_state_dict

    with _gloo(rank, port, 4):
        model = _tiny_qwen()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        layout, cpu = CenteredLatents2x2(4, 8), torch.device("cpu")
        g = torch.Generator().manual_seed(1)
        x, ctx, t = torch.randn(2, 15, 16, generator=g), torch.randn(2, 7, 16, generator=g), torch.tensor([0.3, 0.8])
        rope = model.rope(layout.text_ids(7, cpu), layout.image_ids(6, 10, cpu))
        mesh = ParallelMesh(ParallelDegrees(tp=2, ulysses=2), "cpu")
        with torch.no_grad():
            expected = model(x, ctx, None, t, rope)
            sharded = _tiny_qwen(tp=TensorParallel(mesh.group("tp")))
            sharded.load_state_dict(shard_state_dict(sharded, model.state_dict()))
            sp = SequenceParallel(mesh, ctx.shape[1], x.shape[1])
            text, image = sp.shard(ctx, x)
            with sp.active():
                got = sp.gather_image(sharded(image, text, None, t, sp.shard_rope(rope)))
        assert _rel_err(got, expected) <= 1e-5, _rel_err(got, expected)


def test_tensor_x_ulysses_parallel_module_matches_single_rank():
    """TP 2 x Ulysses 2 on 4 gloo ranks, 4 heads, 15 image and 7 text tokens (uneven shards)."""
    import torch.multiprocessing as mp

    from tests.servers import free_port

    mp.spawn(_tp_rank, args=(free_port(),), nprocs=4, join=True)


def _variable_text_rank(rank: int, port: int):
    from torch._dynamo.utils import counters

    from services.denoiser.compile import compile_blocks
    from services.denoiser.parallel.context import SequenceParallel
    from services.denoiser.parallel.mesh import ParallelDegrees, ParallelMesh

    with _gloo(rank, port, 2):
        model, compiled = _tiny_qwen(), _tiny_qwen()
        compile_blocks(compiled, backend="eager", overlap_comm=True, variable_text=True)  # as the stage does
        mesh = ParallelMesh(ParallelDegrees(ulysses=2), "cpu")
        layout, cpu = CenteredLatents2x2(4, 8), torch.device("cpu")
        counters.clear()
        with torch.no_grad():
            for text_len in (5, 8, 9, 12, 13):  # odd lengths split unevenly over the two ranks
                g = torch.Generator().manual_seed(text_len)
                x, ctx, t = torch.randn(1, 15, 16, generator=g), torch.randn(1, text_len, 16, generator=g), torch.rand(1)
                rope = model.rope(layout.text_ids(text_len, cpu), layout.image_ids(6, 10, cpu))
                sp = SequenceParallel(mesh, text_len, 15, outside_graphs=True)
                text, image = sp.shard(ctx, x)
                with sp.active():
                    got = sp.gather_image(compiled(image, text, None, t, sp.shard_rope(rope)))
                expected = model(x, ctx, None, t, rope)
                assert _rel_err(got, expected) <= 1e-5, (text_len, _rel_err(got, expected))
        # static graphs for the first length, then one with the text length symbolic (each
        # side of an uneven split may add one): not a graph per length
        assert counters["stats"]["unique_graphs"] <= 3, counters["stats"]


def test_compiled_blocks_under_ulysses_do_not_recompile_per_prompt_length():
    """A Qwen-Image replica with Ulysses 2: each prompt reaches the DiT at its own length, so the
    token split differs per request. The exchanges run outside the compiled blocks
    (SequenceParallel's outside_graphs), which then compile once for the text length's
    dynamism instead of once per length (traced exchanges made one graph per split), with the
    single-rank result at every length."""
    import torch.multiprocessing as mp

    from tests.servers import free_port

    mp.spawn(_variable_text_rank, args=(free_port(),), nprocs=2, join=True)

# --- per-request LoRA and cache ----------------------------------------------------------------


def test_per_request_lora_matches_diffusers(qwen_image_dir, pipe, tmp_path):
    """A diffusers-layout LoRA on every block linear, at strength 0.7, against diffusers'."""
    lora = fc.write_block_lora(tmp_path / "style.safetensors", qwen_image_dir, "qwen_image", ("transformer_blocks.",))
    fc.check_lora_against_diffusers(qwen_image_dir, pipe, lora, prompt="a red circle", height=32, width=48,
                                    num_inference_steps=2)


def test_per_request_cache(qwen_image_dir):
    fc.check_per_request_cache(qwen_image_dir)


def test_compiled_blocks_take_the_text_length_as_a_dynamic_shape():
    """Each prompt reaches the DiT at its own length: compiled blocks (spec.variable_text) go
    dynamic at the first recompile instead of compiling one graph per length."""
    from torch._dynamo.utils import counters

    from services.denoiser.compile import compile_blocks
    from services.denoiser.models.qwen_image import QwenImageConfig, QwenImageTransformer

    config = QwenImageConfig(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                             num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
    layout, cpu = CenteredLatents2x2(4, 8), torch.device("cpu")
    graphs = {}
    for variable in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = QwenImageTransformer(config).eval()
        compile_blocks(model, backend="eager", variable_text=variable)
        with torch.no_grad():
            for text_len in (5, 7, 9, 11, 13):
                rope = model.rope(layout.text_ids(text_len, cpu), layout.image_ids(6, 8, cpu))
                model(torch.randn(1, 12, 16), torch.randn(1, text_len, 16), None, torch.rand(1), rope)
        graphs[variable] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs[False] == 5 and graphs[True] <= 3, graphs


def test_modulations_are_tabulated_once_for_both_cfg_branches(qwen_image_dir, monkeypatch):
    """Qwen-Image's modulations depend on the timestep alone: a request's table (one GEMM of its
    steps per modulation layer, before the first step) serves the positive and the negative
    branch, and the latents are those of the per-step GEMVs."""
    from services.denoiser.stage import DenoiserStage
    from services.runtime.config import DenoiserConfig
    from services.runtime.messages import Conditioning, DenoiseRequest

    native = load_native_transformer(ModelDir(qwen_image_dir), "qwen_image", dtype=torch.float32,
                                     device=torch.device("cpu"))
    layout, cpu = CenteredLatents2x2(4, 8), torch.device("cpu")
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(2, 12, 16, generator=g), torch.randn(2, 7, 16, generator=g), torch.rand(2, generator=g)
    with torch.inference_mode():
        rope = native.rope(layout.text_ids(7, cpu), layout.image_ids(6, 8, cpu))
        plain = native(x, ctx, None, t, rope)
        row = native.modulation_table(t, None, torch.zeros(2, 0), torch.float32)
        assert row.shape == (2, native.modulation_width)
        assert _rel_err(native(x, ctx, None, t, rope, modulations=row), plain) < 1e-6

    stage = DenoiserStage(DenoiserConfig(model_path=qwen_image_dir, device="cpu", dtype="float32"))
    positive = Conditioning(torch.randn(1, 7, 16, generator=g), torch.zeros(1, 0))
    negative = Conditioning(torch.randn(1, 4, 16, generator=g), torch.zeros(1, 0))
    request = DenoiseRequest(positive=positive, negative=negative, height=32, width=48, num_inference_steps=4,
                             guidance_scale=1.0, true_cfg_scale=4.0, seeds=[1])
    reads = []
    stage.runner.model.transformer_blocks[1].img_mod[1].register_forward_hook(lambda m, a, o: reads.append(len(a[0])))
    tabulated = stage.denoise(request).latents
    assert reads == [4]  # one table of the 4 steps, for both branches; nothing during the steps
    reads.clear()
    monkeypatch.setattr(stage.runner, "precompute", lambda inputs, timesteps: None)
    stepwise = stage.denoise(request).latents
    assert reads == [1] * 8  # without: one row per branch, every step
    assert _rel_err(tabulated, stepwise) < 1e-5

    # two samples on the same timesteps share the one table too (their rows are views of it)
    pair = DenoiseRequest(positive=Conditioning(positive.prompt_embeds.expand(2, -1, -1), torch.zeros(2, 0)),
                          negative=Conditioning(negative.prompt_embeds.expand(2, -1, -1), torch.zeros(2, 0)),
                          height=32, width=48, num_inference_steps=4, guidance_scale=1.0, true_cfg_scale=4.0,
                          seeds=[1, 2])
    monkeypatch.undo()
    reads.clear()
    both = stage.denoise(pair).latents
    assert reads == [4]
    assert _rel_err(both[0], tabulated[0]) < 1e-5 and _rel_err(both[1], both[0]) > 1e-2  # seeds 1 and 2
