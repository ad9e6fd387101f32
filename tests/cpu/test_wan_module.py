"""Native Wan transformer vs diffusers.WanTransformer3DModel on the same weights (fp32 to
rounding, bf16 loosely), through the real loader, and on gloo ranks: Ulysses 2, ring 2 and
tensor parallel 2 give the single-rank output to fp32 relative error <= 1e-5."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.denoiser.models.wan import WanConfig, WanTransformer, patchify, unpatchify
from services.denoiser.parallel.context import SequenceParallel
from services.denoiser.parallel.mesh import ParallelDegrees, ParallelMesh
from services.denoiser.parallel.tp import TensorParallel, shard_state_dict
from tests.servers import free_port

# diffusers' constructor arguments of a tiny Wan DiT. head_dim 12 splits into RoPE axes (4, 4, 4);
# 3 heads do not divide the Ulysses degree 2.
TINY = {"patch_size": (1, 2, 2), "num_attention_heads": 3, "attention_head_dim": 12, "in_channels": 16,
        "out_channels": 16, "text_dim": 32, "freq_dim": 256, "ffn_dim": 40, "num_layers": 2, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}
# Wan 2.1 I2V: CLIP image tokens through image_embedder into the cross-attention's add_k/v_proj
# (whose input is the embedder's output: the model width, heads x head_dim).
I2V = {"image_dim": 16, "added_kv_proj_dim": 3 * 12}
# diffusers splits [image; text] context at "length - 512": I2V text is always 512 tokens there.
I2V_TEXT_LEN = 512


def _widened(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Zero-initialised gates and output layers make random DiTs output ~constants; widen them.
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def _reference(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return _widened(WanTransformer3DModel(**{**TINY, **overrides}), seed)


def _native_of(ref) -> WanTransformer:
    native = WanTransformer(WanConfig.from_dict(dict(ref.config))).eval()
    native.load_state_dict(ref.state_dict(), strict=True)
    return native


def _inputs(cfg: WanConfig, batch: int, frames: int, height: int, width: int, text_len: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, frames, height, width, generator=g)
    text = torch.randn(batch, text_len, cfg.text_dim, generator=g)
    t = torch.tensor([999.0, 417.3, 35.0][:batch])  # the scheduler's 0..1000 scale, as Wan passes it
    return latents, text, t


def _native_video(native: WanTransformer, latents, text, t, image=None) -> torch.Tensor:
    cfg = native.config
    _, _, f, h, w = latents.shape
    out = native(patchify(latents, cfg.patch_size), text, None, t, native.rope(f, h, w),
                 encoder_hidden_states_image=image)
    return unpatchify(out, f, h, w, cfg.patch_size, cfg.out_channels)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "frames,height,width,overrides",
    [(3, 6, 10, {}), (5, 8, 4, {}), (4, 6, 4, {"patch_size": (2, 2, 2), "cross_attn_norm": False})],
    ids=["3x6x10", "5x8x4", "patch2x2x2"],
)
def test_matches_diffusers_fp32(frames, height, width, overrides):
    ref = _reference(**overrides)
    native = _native_of(ref)
    latents, text, t = _inputs(native.config, 2, frames, height, width, text_len=7)
    with torch.no_grad():
        expected = ref(latents, t, text, return_dict=False)[0]
        got = _native_video(native, latents, text, t)
    assert expected.std() > 0.1, "outputs too small to be a meaningful comparison"
    assert got.shape == expected.shape
    assert _rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("pos_embed_seq_len", [None, 10], ids=["i2v", "flf2v"])
def test_image_conditioning_matches_diffusers(pos_embed_seq_len):
    ref = _reference(**I2V, pos_embed_seq_len=pos_embed_seq_len)
    native = _native_of(ref)
    latents, text, t = _inputs(native.config, 2, 3, 6, 10, text_len=I2V_TEXT_LEN)
    # first-last-frame: two images a sample, consecutive rows, joined by the embedder.
    images = 4 if pos_embed_seq_len else 2
    image = torch.randn(images, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(latents, t, text, encoder_hidden_states_image=image, return_dict=False)[0]
        got = _native_video(native, latents, text, t, image)
    assert _rel_err(got, expected) <= 1e-5
    with pytest.raises(ValueError, match="needs CLIP image embeddings"):
        _native_video(native, latents, text, t)


def test_per_token_timesteps_match_diffusers():
    """Wan 2.2 TI2V (expand_timesteps): a timestep per token, 0 on the conditioning frame."""
    ref = _reference()
    native = _native_of(ref)
    latents, text, t = _inputs(native.config, 2, 3, 6, 10, text_len=7)
    per_token = t[:, None].repeat(1, 3 * 3 * 5)
    per_token[:, : 3 * 5] = 0.0
    with torch.no_grad():
        expected = ref(latents, per_token, text, return_dict=False)[0]
        got = _native_video(native, latents, text, per_token)
    assert _rel_err(got, expected) <= 1e-5


def test_matches_diffusers_bf16():
    """The same bf16 weights on both sides (diffusers' RoPE tables stay fp32, as its
    from_pretrained keeps them): the casts mirror diffusers', so today the outputs agree bit for bit."""
    ref = _reference()
    native = _native_of(ref).bfloat16()
    tables = ref.rope.freqs_cos, ref.rope.freqs_sin
    ref = ref.bfloat16()
    ref.rope.freqs_cos, ref.rope.freqs_sin = tables
    latents, text, t = _inputs(native.config, 2, 3, 6, 10, text_len=9)
    latents, text = latents.bfloat16(), text.bfloat16()
    with torch.no_grad():
        expected = ref(latents, t, text, return_dict=False)[0]
        got = _native_video(native, latents, text, t)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got.float(), expected.float()) <= 1e-2


def test_loads_pipeline_dir(tmp_path, monkeypatch):
    """Through the real loader (the family registered as the other families are): fp32 matches
    diffusers; in bf16 every weight is cast (diffusers keeps its _keep_in_fp32_modules in fp32),
    and the output is about as far from fp32 as diffusers' own bf16 output."""
    from diffusers import WanTransformer3DModel

    from services.denoiser import models
    from services.denoiser.weights import load_native_transformer
    from services.runtime.registry import ModelDir
    from tests.tiny_families import build_tiny_wan

    monkeypatch.setitem(models.FAMILIES, "wan",
                        models.NativeFamily(WanConfig, WanTransformer, ("WanTransformer3DModel",)))
    path = build_tiny_wan(tmp_path / "wan")
    cpu = torch.device("cpu")
    ref = WanTransformer3DModel.from_pretrained(path / "transformer").eval()
    ref_bf16 = WanTransformer3DModel.from_pretrained(path / "transformer", torch_dtype=torch.bfloat16).eval()
    native = load_native_transformer(ModelDir(path), "wan", dtype=torch.float32, device=cpu)
    native_bf16 = load_native_transformer(ModelDir(path), "wan", dtype=torch.bfloat16, device=cpu)
    assert native.state_dict().keys() == ref.state_dict().keys()

    latents, text, t = _inputs(native.config, 2, 3, 6, 10, text_len=9)
    with torch.no_grad():
        expected = ref(latents, t, text, return_dict=False)[0]
        assert _rel_err(_native_video(native, latents, text, t), expected) <= 1e-5
        latents, text = latents.bfloat16(), text.bfloat16()
        got = _native_video(native_bf16, latents, text, t).float()
        diffusers_bf16 = ref_bf16(latents, t, text, return_dict=False)[0].float()
    assert _rel_err(got, expected) <= 1.25 * _rel_err(diffusers_bf16, expected)  # ~0.009 each today


# ---------------------------------------------------------------------------------------------
# gloo ranks


def _rank_main(rank: int, world: int, port: int, degrees: ParallelDegrees, per_token: bool):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # TP splits whole heads: 4 for tp 2; the I2V layout also puts norm_added_k under TP.
        overrides = {"num_attention_heads": 4, **I2V, "added_kv_proj_dim": 4 * 12} if degrees.tp > 1 else {}
        config = WanConfig.from_dict({**TINY, **overrides})
        model = _widened(WanTransformer(config), seed=0)
        latents, text, t = _inputs(config, 2, 3, 6, 10, text_len=7)  # 45 tokens: uneven over 2 ranks
        x = patchify(latents, config.patch_size)
        rope = model.rope(3, 6, 10)
        if per_token:
            t = t[:, None] * torch.linspace(0.0, 1.0, x.shape[1])
        image = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2)) if degrees.tp > 1 else None
        mesh = ParallelMesh(degrees, "cpu")
        with torch.no_grad():
            expected = model(x, text, None, t, rope, encoder_hidden_states_image=image)
            if degrees.tp > 1:
                sharded = WanTransformer(config, tp=TensorParallel(mesh.group("tp"))).eval()
                sharded.load_state_dict(shard_state_dict(sharded, model.state_dict()))
                got = sharded(x, text, None, t, rope, encoder_hidden_states_image=image)
            else:
                # Only the video tokens are sharded; every rank keeps the whole text.
                sp = SequenceParallel(mesh, 0, x.shape[1])
                piece = sp.image.piece(mesh.sp_rank)
                local_t = t[:, piece] if per_token else t
                with sp.active():
                    local = model(x[:, piece], text, None, local_t, sp.shard_rope(rope),
                                  encoder_hidden_states_image=image)
                got = sp.gather_image(local)
        assert got.shape == expected.shape, (got.shape, expected.shape)
        err = _rel_err(got, expected)
        assert err <= 1e-5, f"rank {rank} {degrees}: relative error {err:.2e}"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "degrees,per_token",
    [(ParallelDegrees(ulysses=2), False), (ParallelDegrees(ring=2), True), (ParallelDegrees(tp=2), False)],
    ids=["ulysses2", "ring2-per-token-t", "tp2-i2v"],
)
def test_parallel_matches_single_rank(degrees, per_token):
    world = degrees.world_size
    mp.spawn(_rank_main, args=(world, free_port(), degrees, per_token), nprocs=world, join=True)
