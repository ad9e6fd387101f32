"""Sequence parallelism on CPU ranks (gloo): Ulysses, ring and both (USP) give the single-rank
output of the native Flux transformer to fp32 relative error <= 1e-5, also when neither the
text tokens, the image tokens nor the heads divide the degree (Ulysses' packed path for heads
that divide evenly and its general one for heads that do not both run here)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.denoiser.compile import compile_blocks
from services.denoiser.latents import PackedLatents2x2
from services.denoiser.models.flux import FluxConfig, FluxTransformer
from services.denoiser.parallel.context import SequenceParallel
from services.denoiser.parallel.mesh import ParallelDegrees, ParallelMesh
from services.denoiser.parallel.tp import TensorParallel, shard_state_dict
from tests.servers import free_port

# 3 heads: uneven for every degree here. 6x10 latents -> 15 packed image tokens: uneven too.
CONFIG = FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=3,
                    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
# Tensor parallelism splits whole heads: 4 heads for tp 2 (and for Ulysses' even-heads cases).
CONFIG_TP = FluxConfig(**{**CONFIG.__dict__, "num_attention_heads": 4})


def _model_and_inputs(h: int, w: int, text_len: int = 7, config: FluxConfig = CONFIG):
    torch.manual_seed(0)
    model = FluxTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    g = torch.Generator().manual_seed(1)
    layout = PackedLatents2x2(4, 8)
    x = torch.randn(2, (h // 2) * (w // 2), 16, generator=g)
    ctx = torch.randn(2, text_len, 32, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    t, guidance = torch.tensor([0.3, 0.8]), torch.tensor([3.5, 3.5])
    rope = model.rope(layout.text_ids(text_len, torch.device("cpu")), layout.image_ids(h, w, torch.device("cpu")))
    return model, (x, ctx, pooled, t, rope, guidance)


def _rank_main(rank: int, world: int, port: int, degrees: ParallelDegrees, h: int, w: int, backend: str | None = None,
               four_heads: bool = False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, (x, ctx, pooled, t, rope, guidance) = _model_and_inputs(h, w, config=CONFIG_TP if degrees.tp > 1 or four_heads else CONFIG)
        mesh = ParallelMesh(degrees, "cpu")
        with torch.no_grad():
            expected = model(x, ctx, pooled, t, rope, guidance)
            if degrees.tp > 1:
                sharded = FluxTransformer(model.config, tp=TensorParallel(mesh.group("tp"))).eval()
                sharded.load_state_dict(shard_state_dict(sharded, model.state_dict()))
                model = sharded
            if backend is not None:  # the compiled blocks trace every collective (no P2P ops)
                compile_blocks(model, backend=backend, overlap_comm=True)
            sp = SequenceParallel(mesh, ctx.shape[1], x.shape[1])
            text, image = sp.shard(ctx, x)
            # also as a forward replayed from CUDA graphs runs it (Ulysses: the exchanges in one op)
            for view in {id(v): v for v in (sp, sp.for_graphs())}.values():
                with view.active():
                    local = model(image, text, pooled, t, sp.shard_rope(rope), guidance)
                got = sp.gather_image(local)
                err = ((got - expected).norm() / expected.norm()).item()
                assert got.shape == expected.shape, (got.shape, expected.shape)
                assert err <= 1e-5, f"rank {rank} {degrees}: relative error {err:.2e}"
    finally:
        dist.destroy_process_group()
    if backend is not None:
        # Checked and done. Skip the interpreter's teardown: once, under CI load, a rank that had
        # run compiled functional collectives aborted there ("terminate called without an active
        # exception", a C++ thread still joinable at exit), after its check had passed.
        os._exit(0)


@pytest.mark.parametrize(
    "degrees,h,w,four_heads",
    [
        (ParallelDegrees(ulysses=2), 6, 10, False),
        (ParallelDegrees(ulysses=2), 6, 10, True),
        (ParallelDegrees(ulysses=3), 8, 8, False),
        (ParallelDegrees(ring=2), 6, 10, False),
        (ParallelDegrees(ring=3), 10, 6, False),
        (ParallelDegrees(ring=2, ulysses=2), 6, 10, False),
        (ParallelDegrees(ring=2, ulysses=2), 6, 10, True),
        (ParallelDegrees(tp=2), 6, 10, False),
        (ParallelDegrees(tp=2, ulysses=2), 6, 10, False),
    ],
    ids=["ulysses2", "ulysses2-even-heads", "ulysses3", "ring2", "ring3", "ring2xulysses2",
         "ring2xulysses2-even-heads", "tp2", "tp2xulysses2"],
)
def test_sequence_parallel_matches_single_rank(degrees, h, w, four_heads):
    world = degrees.world_size
    mp.spawn(_rank_main, args=(world, free_port(), degrees, h, w, None, four_heads), nprocs=world, join=True)


@pytest.mark.parametrize(
    "degrees,four_heads",
    [(ParallelDegrees(ring=2), False), (ParallelDegrees(ulysses=2), True), (ParallelDegrees(ring=2, ulysses=2), False),
     (ParallelDegrees(tp=2, ulysses=2), False)],
    ids=["ring2", "ulysses2-even-heads", "ring2xulysses2", "tp2xulysses2"],
)
def test_compiled_blocks_match_single_rank(degrees, four_heads):
    """The service compiles a multi-rank replica's blocks with fullgraph=True: every collective
    (the ring's K/V exchange included) must trace. aot_eager runs dynamo and AOT tracing as
    inductor does, without its C++ compile (minutes on CPU)."""
    world = degrees.world_size
    mp.spawn(_rank_main, args=(world, free_port(), degrees, 6, 10, "aot_eager", four_heads), nprocs=world, join=True)


def _ulysses_op_rank(rank: int, world: int, port: int):
    from services.denoiser.attention import local_attention
    from services.denoiser.parallel.mesh import even_split, offsets
    from services.denoiser.parallel.ulysses import ulysses_attention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 11, 6, 8, generator=g) for _ in range(3))
        expected = local_attention(q, k, v)
        sizes = even_split(11, world)
        mine = slice(offsets(sizes)[rank], offsets(sizes)[rank] + sizes[rank])
        group = dist.group.WORLD
        for grad in (False, True):  # the op, and the traced exchanges that autograd goes through
            with torch.set_grad_enabled(grad):
                got = ulysses_attention(q[:, mine], k[:, mine], v[:, mine], sizes, group, rank, local_attention,
                                        opaque=group.group_name)
            torch.testing.assert_close(got, expected[:, mine], rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # checked; skip the teardown that can abort after gloo collectives (see _rank_main)


@pytest.mark.parametrize("world", [2, 3])
def test_ulysses_attend_op_matches_attention(world):
    """ulysses.py's ops (ulysses_post's exchange, then ulysses_finish: the other ranks' queries
    first, their output sent back beside this rank's own queries' attention) give full
    attention's rows of each rank's shard, with
    shards of unequal size; at 3 ranks the middle rank's other queries are two ranges and its
    returned heads two slots."""
    mp.spawn(_ulysses_op_rank, args=(world, free_port()), nprocs=world, join=True)


def _compiled_order_rank(rank: int, world: int, port: int):
    from torch._inductor.utils import run_and_get_code

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, (x, ctx, pooled, t, rope, guidance) = _model_and_inputs(6, 10, config=CONFIG_TP)
        with torch.no_grad():
            expected = model(x, ctx, pooled, t, rope, guidance)
            compile_blocks(model, backend="inductor", overlap_comm=True)
            sp = SequenceParallel(ParallelMesh(ParallelDegrees(ulysses=world), "cpu"), ctx.shape[1], x.shape[1])
            text, image = sp.shard(ctx, x)
            with sp.for_graphs().active():
                local, codes = run_and_get_code(model, image, text, pooled, t, sp.shard_rope(rope), guidance)
            got = sp.gather_image(local)
        assert ((got - expected).norm() / expected.norm()).item() <= 1e-5
        # the single block's code (its proj_out reads a [64, 320] weight), whose only GEMM of
        # [tokens, 64] x [64, 256] is the MLP's
        [single] = {c for c in codes if "ulysses_finish" in c and "(1, 320)" in c}
        call = single[single.index("def call("):]
        post, finish = call.index("ditserve.ulysses_post.default("), call.index("ditserve.ulysses_finish.default(")
        mlp = call.index("(64, 256), (1, 64)")  # the MLP weight [256, 64] read transposed
        assert post < mlp < finish, (post, mlp, finish)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # checked; skip the teardown that can abort after gloo collectives (see _rank_main)


def test_compiled_single_block_runs_its_mlp_gemm_beside_the_exchange():
    """Under inductor (the service's compile of a multi-rank replica) a graphed Ulysses forward
    keeps Flux's single-block MLP GEMM between ulysses_post and ulysses_finish, where it runs
    beside the q/k/v exchange on a GPU: inductor's peak-memory reordering had moved it before
    both (compile.py)."""
    mp.spawn(_compiled_order_rank, args=(2, free_port()), nprocs=2, join=True)
