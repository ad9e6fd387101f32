"""fp8 attention (`--dit-attention-precision fp8`, services/denoiser/attention_fp8.py). On CPU the
op runs its emulation of cuDNN's quantisation points, so these tests cover the scaling, the
batch independence, the compiled path and a whole request; tests/gpu checks cuDNN's kernel."""

import asyncio

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from services.cli import build_in_process_router, main
from services.denoiser.attention_fp8 import fp8_attention
from services.denoiser.quant import FP8
from services.runtime.config import GenerateRequest, StageConfig


def _inputs(batch=2, seq=300, heads=4, dim=64, qk_scale=1.0):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, seq, heads, dim, generator=g) * s for s in (qk_scale, qk_scale, 1.0)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("qk_scale, bound", [(1.0, 0.07), (2.0, 0.11)])
def test_fp8_attention_error_against_exact_attention(qk_scale, bound):
    """What fp8 costs: ~6% relative error with soft attention, ~10% with peaked (logit std 4),
    mostly from rounding q and k (measured: q/k alone 0.088 of the 0.096 at std 4)."""
    q, k, v = _inputs(qk_scale=qk_scale)
    ref = _sdpa(q, k, v)
    out = fp8_attention(q, k, v)
    assert out.shape == ref.shape and out.dtype == q.dtype
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0.01 < err < bound  # fp8, not a silent fallback to exact attention


def test_each_sample_is_scaled_alone_and_compiles_to_the_same_values():
    """Per-sample scales: a sample's result does not depend on the others in its batch (one of
    them 100x larger here); the compiled path (fullgraph, as the blocks compile) gives the same."""
    q, k, v = _inputs()
    q[0], k[0], v[0] = q[0] * 100, k[0] * 100, v[0] * 100
    out = fp8_attention(q, k, v)
    assert torch.equal(fp8_attention(q[1:], k[1:], v[1:])[0], out[1])
    assert torch.equal(torch.compile(fp8_attention, fullgraph=True)(q, k, v), out)


def test_a_request_with_fp8_attention(flux_dev_dir, tmp_path):
    """The option reaches the model's attention: the image moves a little from the exact one, and
    the CLI flag takes the same path."""
    kwargs = dict(prompt="a red circle", height=64, width=64, num_inference_steps=3, seed=5)
    images = []
    for precision in ("default", "fp8"):
        router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"),
                                         denoiser_options={"attention_precision": precision})
        images.append(asyncio.run(router.generate(GenerateRequest(**kwargs))).images[0].pixels.astype(int))
    diff = np.abs(images[0] - images[1])
    assert 0 < diff.mean() < 3, diff.mean()
    out = tmp_path / "fp8attn.png"
    assert main(["generate", "--model-path", str(flux_dev_dir), "--prompt", "x", "--device", "cpu",
                 "--dit-attention-precision", "fp8", "--height", "64", "--width", "64", "--num-inference-steps", "2",
                 "--no-progress", "-o", str(out)]) == 0 and out.stat().st_size > 0


def test_a_replica_that_cannot_run_fp8_attention_refuses_to_start(flux_dev_dir, monkeypatch):
    """Where cuDNN has no fp8 kernel (no Hopper, no cudnn-frontend, a head width it lacks) the
    replica does not start, and says why; requests never reach a kernel that is not there.
    (On a GPU the reason comes from building a cuDNN plan for the model's head width.)"""
    import services.denoiser.stage as stage_module
    from services.runtime.config import DenoiserConfig
    from services.runtime.errors import InvalidRequestError

    asked = []
    monkeypatch.setattr(stage_module, "unavailable_reason",
                        lambda device, head_dim: asked.append(head_dim) or "no fp8 kernel here")
    with pytest.raises(InvalidRequestError, match="no fp8 kernel here") as err:
        stage_module.DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu", attention_precision="fp8"))
    assert err.value.param == "attention_precision" and asked == [16]  # the tiny model's heads


def test_q_and_k_scaled_by_their_rms_norm_bounds():
    """Flux's q and k (RMSNorm then RoPE) never exceed rms_norm_bound, which fp8 attention then
    uses as their static scale: the error is the measured-amax one's (e4m3 rounds as finely
    anywhere in its normal range), and a bound that is wrong saturates instead of giving NaN."""
    from services.denoiser.attention import rms_norm_bound
    from services.denoiser.models.flux import apply_rope, rope_tables

    g = torch.Generator().manual_seed(1)
    norm_q, norm_k = torch.nn.RMSNorm(64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        for n in (norm_q, norm_k):
            n.weight.copy_(torch.rand(64, generator=g) * 2)
    ids = torch.stack([torch.zeros(300), torch.arange(300) // 20, torch.arange(300) % 20], dim=1)
    cos, sin = rope_tables(ids, (16, 24, 24))
    x = [torch.randn(2, 300, 4, 64, generator=g) * s for s in (1, 1, 1)]
    x[0][0, 7, 1] = 0  # a one-hot row reaches the bound itself: sqrt(D) max|w|
    x[0][0, 7, 1, int(norm_q.weight.argmax())] = 5
    q, k = (apply_rope(n(t), cos, sin) for n, t in ((norm_q, x[0]), (norm_k, x[1])))
    bounds = (rms_norm_bound(norm_q), rms_norm_bound(norm_k))
    assert q.abs().max() <= bounds[0] and k.abs().max() <= bounds[1]
    assert q.abs().max() > 0.95 * bounds[0]  # tight where the row is one-hot
    v = x[2]
    ref = _sdpa(q, k, v)
    measured, bounded = fp8_attention(q, k, v), fp8_attention(q, k, v, bounds)
    err = [((o - ref).norm() / ref.norm()).item() for o in (measured, bounded)]
    assert 0.01 < err[1] < 1.2 * err[0] + 0.005, err
    wrong = fp8_attention(q, k, v, (bounds[0] / 100, bounds[1]))
    assert torch.isfinite(wrong).all()


def test_flux_passes_bounds_that_hold_to_fp8_attention(flux_dev_dir, monkeypatch):
    """Through a whole request: every attention of the Flux forward gets its bounds, and they
    hold (on q and k in the model's dtype: the path a sequence-parallel rank takes)."""
    import services.denoiser.attention_fp8 as fp8_module
    import services.denoiser.models.flux as flux_module

    seen = []
    real = fp8_module.fp8_attention

    def recording(q, k, v, amax_qk=None):
        seen.append(amax_qk is not None and bool(q.abs().max() <= amax_qk[0]) and bool(k.abs().max() <= amax_qk[1]))
        return real(q, k, v, amax_qk)

    monkeypatch.setattr(fp8_module, "fp8_attention", recording)
    monkeypatch.setattr(flux_module, "attends_alone", lambda: False)
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"),
                                     denoiser_options={"attention_precision": "fp8", "compile": False})
    asyncio.run(router.generate(GenerateRequest(prompt="a red circle", height=64, width=64,
                                                num_inference_steps=2, seed=5)))
    assert seen and all(seen), seen


@pytest.mark.parametrize("precision", ["default", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_and_k_from_the_one_pass_norm_op_equal_the_unfused_path(flux_dev_dir, monkeypatch, dtype, precision):
    """A rank attending alone gets q and k from qk_norm.py's one-pass op (on CPU its reference,
    the same ops as the unfused path), straight from the text's and the image's projections, in
    e4m3 under fp8 attention: the forward's output is bit for bit the one of the unfused path
    (norm, join, RoPE; attention quantising q and k at the same bounds), double and single
    blocks alike."""
    import services.denoiser.models.flux as flux_module
    from services.denoiser.attention import attention_precision
    from services.denoiser.weights import load_native_transformer
    from services.runtime.registry import ModelDir
    from tests.cpu.test_flux_module import _inputs

    model = load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=dtype, device=torch.device("cpu"))
    x, ctx, pooled, t, guidance, img_ids, txt_ids = _inputs(model.config, 2, 6, 10, 13, 0)
    calls = []
    fused = flux_module.rms_norm_rope

    def recording(text, image, *rest):
        out = fused(text, image, *rest)
        calls.append((text.shape[1], out.dtype))
        return out

    monkeypatch.setattr(flux_module, "rms_norm_rope", recording)
    args = (x.to(dtype), ctx.to(dtype), pooled.to(dtype), t, model.rope(txt_ids, img_ids), guidance)
    with torch.inference_mode(), attention_precision(precision):
        one_pass = model(*args)
        monkeypatch.setattr(flux_module, "attends_alone", lambda: False)
        unfused = model(*args)
    out = FP8 if precision == "fp8" else dtype
    assert sorted(c[0] for c in calls) == [0] * 2 * model.config.num_single_layers + [13] * 2 * model.config.num_layers
    assert {c[1] for c in calls} == {out} and torch.equal(one_pass, unfused)
