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
