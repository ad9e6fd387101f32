"""Native Flux.2 transformer vs diffusers' Flux2Transformer2DModel on the same weights: fp32 and
bf16 parity, the pipeline's ids and latent packing, loading a tiny Flux.2 [klein] checkpoint,
the block cache, and sequence / tensor parallelism on gloo ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.denoiser.models import flux2
from services.denoiser.models.flux2 import Flux2Config, Flux2Transformer
from services.denoiser.parallel.mesh import ParallelDegrees
from services.vae.stage import unpatchify

# [dev]-like (guidance embedding) with 3 heads: uneven for every sp degree here.
CONFIG = Flux2Config(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=3,
                     joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                     guidance_embeds=True)
# [klein]-like (no guidance), 4 heads: tensor parallelism splits whole heads.
CONFIG_TP = Flux2Config(**{**CONFIG.__dict__, "num_attention_heads": 4, "guidance_embeds": False})
CPU = torch.device("cpu")


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _widen(model: torch.nn.Module) -> torch.nn.Module:
    # Zero-initialised gates and outputs make random DiTs output ~constants (tests/tiny_families.py).
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _diffusers_model(config: Flux2Config, seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    fields = {k: v for k, v in config.__dict__.items()}
    return _widen(Flux2Transformer2DModel(**fields)).eval()


def _native_from(ref, config: Flux2Config, dtype=torch.float32) -> Flux2Transformer:
    native = Flux2Transformer(config).to(dtype).eval()
    native.load_state_dict(ref.state_dict(), strict=True)
    return native


def _inputs(cfg: Flux2Config, batch: int, h: int, w: int, text_len: int, seed: int = 0):
    """Packed latents for an h x w VAE latent, prompt embeddings, t / 1000, guidance."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, (h // 2) * (w // 2), cfg.in_channels, generator=g)
    ctx = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    t = torch.rand(batch, generator=g)
    guidance = torch.full((batch,), 4.0) if cfg.guidance_embeds else None
    return x, ctx, t, guidance


def _diffusers_forward(ref, x, ctx, t, guidance, h, w):
    """The transformer as the pipeline calls it, with the pipeline's own [B, S, 4] ids."""
    from diffusers import Flux2Pipeline

    latents = torch.zeros(x.shape[0], x.shape[2], h // 2, w // 2)
    img_ids = Flux2Pipeline._prepare_latent_ids(latents)
    txt_ids = Flux2Pipeline._prepare_text_ids(ctx)
    return ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
               guidance=guidance, return_dict=False)[0]


def _native_forward(native, x, ctx, t, guidance, h, w, **kw):
    rope = native.rope(flux2.text_ids(ctx.shape[1], CPU), flux2.image_ids(h, w, CPU))
    return native(x, ctx, None, t, rope, guidance, **kw)


# --- parity with diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "klein"])
@pytest.mark.parametrize("h,w,text_len", [(8, 8, 13), (6, 10, 7)], ids=["4x4", "3x5"])
def test_matches_diffusers_fp32(guidance, h, w, text_len):
    config = Flux2Config(**{**CONFIG.__dict__, "guidance_embeds": guidance})
    ref = _diffusers_model(config)
    native = _native_from(ref, config)
    x, ctx, t, g = _inputs(config, 2, h, w, text_len)
    with torch.no_grad():
        expected = _diffusers_forward(ref, x, ctx, t, g, h, w)
        got = _native_forward(native, x, ctx, t, g, h, w)
    assert got.shape == expected.shape == (2, (h // 2) * (w // 2), 16)
    assert expected.std() > 0.1, "outputs too small to be a meaningful comparison"
    assert _rel_err(got, expected) <= 1e-5


def test_matches_diffusers_bf16():
    ref = _diffusers_model(CONFIG).to(torch.bfloat16)
    native = _native_from(ref, CONFIG, torch.bfloat16)
    x, ctx, t, g = _inputs(CONFIG, 2, 6, 10, 9)
    x, ctx = x.bfloat16(), ctx.bfloat16()
    with torch.no_grad():
        expected = _diffusers_forward(ref, x, ctx, t, g, 6, 10)
        got = _native_forward(native, x, ctx, t, g, 6, 10)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got.float(), expected.float()) <= 1e-2


def test_guidance_distilled_model_needs_guidance():
    native = Flux2Transformer(CONFIG).eval()
    x, ctx, t, _ = _inputs(CONFIG, 1, 4, 4, 3)
    with pytest.raises(ValueError, match="guidance"), torch.no_grad():
        _native_forward(native, x, ctx, t, None, 4, 4)


def test_ids_and_packing_match_the_pipeline():
    from diffusers import Flux2KleinPipeline as P

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 6, 10, generator=g)  # a VAE latent [B, C, h, w]
    patched = P._patchify_latents(latent)
    assert torch.equal(flux2.patchify(latent), patched)
    assert torch.equal(unpatchify(patched), latent)  # the VAE worker's
    tokens = P._pack_latents(patched)
    assert torch.equal(flux2.pack(patched), tokens)
    ids = P._prepare_latent_ids(patched)
    assert torch.equal(flux2.image_ids(6, 10, CPU), ids[0])
    assert torch.equal(flux2.unpack(tokens, 3, 5), P._unpack_latents_with_ids(tokens, ids, 3, 5))
    assert torch.equal(flux2.text_ids(7, CPU), P._prepare_text_ids(torch.zeros(1, 7, 8))[0])
    reference = P._prepare_image_ids([torch.zeros(1, 16, 2, 3), torch.zeros(1, 16, 4, 1)])[0]
    assert torch.equal(torch.cat([flux2.image_ids(4, 6, CPU, t=10), flux2.image_ids(8, 2, CPU, t=20)]), reference)
    # Per token, Flux.1's 2x2 packing of the same VAE latent.
    from services.denoiser.latents import PackedLatents2x2

    assert torch.equal(PackedLatents2x2(4, 8).pack(latent), tokens)


# --- loading a checkpoint ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux2_klein_dir(tmp_path_factory):
    from tests.tiny_families import build_tiny_flux2_klein

    return build_tiny_flux2_klein(tmp_path_factory.mktemp("flux2-klein") / "model")


def test_loads_klein_checkpoint_and_matches_diffusers(flux2_klein_dir, monkeypatch):
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file

    from services.denoiser import models
    from services.denoiser.weights import load_native_transformer
    from services.runtime.registry import ModelDir

    monkeypatch.setitem(models.FAMILIES, "flux2", models.NativeFamily(Flux2Config, Flux2Transformer,
                                                                      ("Flux2Transformer2DModel",)))
    native = load_native_transformer(ModelDir(flux2_klein_dir), "flux2", dtype=torch.float32, device=CPU)
    assert not native.config.guidance_embeds and native.config.num_attention_heads == 2
    on_disk = load_file(flux2_klein_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    state = native.state_dict()
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k], on_disk[k]) for k in on_disk)

    ref = Flux2Transformer2DModel.from_pretrained(flux2_klein_dir / "transformer").eval()
    x, ctx, t, _ = _inputs(native.config, 2, 6, 10, 11, seed=3)
    with torch.no_grad():
        expected = _diffusers_forward(ref, x, ctx, t, None, 6, 10)
        got = _native_forward(native, x, ctx, t, None, 6, 10)
    assert expected.std() > 0.1
    assert _rel_err(got, expected) <= 1e-5


# --- block cache -------------------------------------------------------------------------------


def test_block_cache_that_computes_every_block_is_the_uncached_forward():
    from services.denoiser.cache import BlockCache, CachePolicy

    native = _widen(Flux2Transformer(CONFIG)).eval()
    x, ctx, t, g = _inputs(CONFIG, 2, 6, 10, 7)
    with torch.no_grad():
        expected = _native_forward(native, x, ctx, t, g, 6, 10)
        cache = BlockCache(CachePolicy(preset="ultra").resolved(2))  # step 0 always computes
        got = _native_forward(native, x, ctx, t, g, 6, 10, cache=cache)
        assert cache.computed_steps == 1 and torch.equal(got, expected)
        always = BlockCache(CachePolicy(Fn_compute_blocks=1, residual_diff_threshold=1.0, max_warmup_steps=0)
                            .resolved(2))
        first = _native_forward(native, x, ctx, t, g, 6, 10, cache=always)
        # step 1 caches the middle blocks: with another timestep it reuses step 0's residual
        second = _native_forward(native, x, ctx, t * 0.5, g, 6, 10, cache=always)
    assert torch.equal(first, expected)
    assert always.cached_steps == 1 and torch.isfinite(second).all()
    rope = native.rope(flux2.text_ids(7, CPU), flux2.image_ids(6, 10, CPU))
    assert len(native.block_steps(None, rope, 7)) == CONFIG.num_layers + CONFIG.num_single_layers


# --- tensor parallel fused column layout (services/runtime/tensor_parallel.py) -----------------


def _fake_tp(rank: int, size: int):
    from services.denoiser.parallel.tp import TensorParallel

    tp = object.__new__(TensorParallel)  # no process group: only sharding is exercised
    tp.group, tp.rank, tp.size = None, rank, size
    return tp


def test_column_parallel_blocks_shard_every_piece():
    from services.denoiser.parallel.tp import ColumnParallelLinear

    full = torch.arange(10.0)[:, None].expand(10, 3)  # row i holds i
    layer = ColumnParallelLinear(3, 10, _fake_tp(1, 2), blocks=[4, 6])
    assert layer.weight.shape == (5, 3)
    assert layer.shard("weight", full)[:, 0].tolist() == [2, 3, 7, 8, 9]
    assert layer.shard("bias", torch.arange(10.0)).tolist() == [2, 3, 7, 8, 9]
    plain = ColumnParallelLinear(3, 10, _fake_tp(1, 2))  # no blocks: one contiguous slice, as before
    assert plain.shard("weight", full)[:, 0].tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="add up"):
        ColumnParallelLinear(3, 10, None, blocks=[4, 4])
    with pytest.raises(ValueError, match="does not divide"):
        ColumnParallelLinear(3, 10, _fake_tp(0, 2), blocks=[5, 5])


# --- sequence and tensor parallelism on gloo ranks ---------------------------------------------


def _parallel_rank(rank: int, world: int, port: int, cases: list):
    from services.denoiser.parallel.context import SequenceParallel
    from services.denoiser.parallel.mesh import ParallelMesh
    from services.denoiser.parallel.tp import TensorParallel, shard_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for degrees, config in cases:
            torch.manual_seed(0)
            model = _widen(Flux2Transformer(config)).eval()
            # 6x10 VAE latent -> 15 image tokens, 7 text tokens: neither divides 2 (nor 4).
            x, ctx, t, g = _inputs(config, 2, 6, 10, 7, seed=1)
            rope = model.rope(flux2.text_ids(7, CPU), flux2.image_ids(6, 10, CPU))
            mesh = ParallelMesh(degrees, "cpu")
            with torch.no_grad():
                expected = model(x, ctx, None, t, rope, g)
                if degrees.tp > 1:
                    sharded = Flux2Transformer(config, tp=TensorParallel(mesh.group("tp"))).eval()
                    sharded.load_state_dict(shard_state_dict(sharded, model.state_dict()))
                    model = sharded
                sp = SequenceParallel(mesh, ctx.shape[1], x.shape[1])
                text, image = sp.shard(ctx, x)
                with sp.active():
                    local = model(image, text, None, t, sp.shard_rope(rope), g)
                got = sp.gather_image(local)
            err = _rel_err(got, expected)
            assert got.shape == expected.shape and err <= 1e-5, f"rank {rank} {degrees}: relative error {err:.2e}"
    finally:
        dist.destroy_process_group()


def test_ulysses_and_ring_match_single_rank():
    """Ulysses 2, then ring 2, on the same 2 gloo ranks: 3 heads, 15 image and 7 text tokens."""
    from tests.servers import free_port

    cases = [(ParallelDegrees(ulysses=2), CONFIG), (ParallelDegrees(ring=2), CONFIG)]
    mp.spawn(_parallel_rank, args=(2, free_port(), cases), nprocs=2, join=True)


def test_tensor_x_ulysses_parallel_matches_single_rank():
    """TP 2 x Ulysses 2 on 4 gloo ranks: the fused [q|k|v|gate|up] and [attention|MLP] layers
    shard by pieces; 4 heads, 15 image and 7 text tokens (uneven sequence shards)."""
    from tests.servers import free_port

    mp.spawn(_parallel_rank, args=(4, free_port(), [(ParallelDegrees(tp=2, ulysses=2), CONFIG_TP)]), nprocs=4, join=True)
