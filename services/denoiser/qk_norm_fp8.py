"""QK-RMSNorm, RoPE and the e4m3 quantisation of q / k in one pass: the input of fp8 attention
(`--dit-attention-precision fp8`) on a rank that attends alone (no sequence-parallel exchange).

Compiled, inductor fuses Flux's per-head RMSNorm, RoPE and the static-scale quantisation (the
bound of attention.rms_norm_bound) into one reduction kernel, but it ran at ~0.9 TB/s: 94 us per
single block for q and k together at 1024x1024 (H200). Here each program normalises, rotates and
quantises HEADS head rows of one token in registers: the bf16 input read once, the e4m3 output
written once, the token's RoPE row read once for all of them. 24.5 us a call on that shape
(2.79 ms for the step's 114 calls); the fp8 + fp8-attention step went from 76.2 to 73.9 ms (CUDA
graphs and modulation tables; H200, same run; benchmarks/NOTES.md).

The arithmetic is the eager path's (_reference, which CPU and other devices run): RMSNorm in
fp32 rounded once to the input dtype (torch's rms_norm), RoPE in fp32 rounded again
(apply_rope), then x * 448 / bound, clamped, to e4m3. The sum of squares' order and rsqrt
differ, which can move a value by a bf16 step before RoPE."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from services.denoiser.gelu_fp8 import HAVE_TRITON
from services.denoiser.quant import FP8, FP8_MAX

# Heads of one token per program, which share its RoPE row. Earlier versions, same shape: 32
# rows of any tokens per program, 208 us a call (4,096 values on 128 threads: registers, we
# think); 8 heads with the pairs' partners loaded a second time at col ^ 1, 43 us.
HEADS = 8


def rms_norm_rope_fp8(x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, split: int,
                      cos: torch.Tensor, sin: torch.Tensor, bound: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, S, H, D] (q or k before their norm; any strides with D contiguous) -> e4m3
    [B, S, H, D] (contiguous) of RoPE(RMSNorm(x)) * 448 / bound. Tokens before `split` use
    `weight_a`, the rest `weight_b` (Flux's joint attention: text, then image tokens); cos / sin
    [S, D] fp32 (interleaved pairs); bound a 0-d fp32 upper bound on the result's magnitude."""
    return torch.ops.ditserve.rms_norm_rope_fp8(x, weight_a, weight_b, split, cos, sin, bound, eps)


@torch.library.custom_op("ditserve::rms_norm_rope_fp8", mutates_args=())
def _rms_norm_rope_fp8(x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, split: int,
                       cos: torch.Tensor, sin: torch.Tensor, bound: torch.Tensor, eps: float) -> torch.Tensor:
    b, s, h, d = x.shape
    if not (x.is_cuda and HAVE_TRITON and x.stride(-1) == 1 and d in (16, 32, 64, 128, 256)):
        return _reference(x, weight_a, weight_b, split, cos, sin, bound, eps)
    out = torch.empty((b, s, h, d), dtype=FP8, device=x.device)
    if b * s * h:
        import triton

        cos, sin = cos.contiguous(), sin.contiguous()
        _kernel()[(b * s, triton.cdiv(h, HEADS))](
            x, weight_a, weight_b, cos, sin, bound, out, s, h, split, x.stride(0), x.stride(1), x.stride(2), eps,
            D=d, HEADS=HEADS, num_warps=4)
    return out


@_rms_norm_rope_fp8.register_fake
def _(x, weight_a, weight_b, split, cos, sin, bound, eps):
    return torch.empty(x.shape, dtype=FP8, device=x.device)


def _reference(x, weight_a, weight_b, split, cos, sin, bound, eps) -> torch.Tensor:
    from services.denoiser.attention_fp8 import _quantise_bounded
    from services.denoiser.models.flux import apply_rope  # the interleaved-pair RoPE

    d = x.shape[-1]
    parts = [F.rms_norm(p, (d,), w, eps) for p, w in ((x[:, :split], weight_a), (x[:, split:], weight_b))
             if p.shape[1]]
    normed = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return _quantise_bounded(apply_rope(normed, cos, sin), bound)[0]


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rope_fp8_kernel(x_ptr, wa_ptr, wb_ptr, cos_ptr, sin_ptr, bound_ptr, out_ptr, seq, heads, split,
                                 stride_b, stride_s, stride_h, eps, D: tl.constexpr, HEADS: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)  # b * seq + s
        b, s = token // seq, token % seq
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # this program's heads of the token
        col = tl.arange(0, D)
        half = tl.arange(0, D // 2)
        mask = (h < heads)[:, None]
        src = x_ptr + b * stride_b + s * stride_s + h[:, None] * stride_h
        x = tl.load(src + col[None, :], mask=mask, other=0.0)
        dtype = x.dtype
        x = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        text = s < split  # the token's norm: the text's before `split`
        w = tl.where(text, tl.load(wa_ptr + col), tl.load(wb_ptr + col)).to(tl.float32)
        n = (x * inv[:, None] * w[None, :]).to(dtype).to(tl.float32)  # nn.RMSNorm's output, in x's dtype
        # The (real, imag) pairs as two [HEADS, D/2] halves, split in registers (see HEADS).
        re, im = tl.split(tl.reshape(n, (HEADS, D // 2, 2)))
        row = s * D + 2 * half  # one table row for all the token's heads
        c_re, c_im = tl.load(cos_ptr + row)[None, :], tl.load(cos_ptr + row + 1)[None, :]
        s_re, s_im = tl.load(sin_ptr + row)[None, :], tl.load(sin_ptr + row + 1)[None, :]
        r = tl.interleave(re * c_re - im * s_re, im * c_im + re * s_im)  # apply_rope, pair by pair
        r = r.to(dtype).to(tl.float32)  # apply_rope's output, in x's dtype
        scale = 448.0 / tl.maximum(tl.load(bound_ptr).to(tl.float32), 1e-12)
        q = tl.minimum(tl.maximum(r * scale, -448.0), 448.0)
        dst = out_ptr + (token * heads + h[:, None]) * D + col[None, :]
        tl.store(dst, q.to(out_ptr.dtype.element_ty), mask=mask)

    return rms_norm_rope_fp8_kernel


assert FP8_MAX == 448.0  # the kernel's literal
