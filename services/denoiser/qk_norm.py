"""QK-RMSNorm and RoPE of q or k in one pass, for a rank that attends alone (no sequence-parallel
exchange): out in the model dtype, or quantised to e4m3 for fp8 attention
(`--dit-attention-precision fp8`, at the static scale of attention.rms_norm_bound).

Compiled, inductor fuses Flux's per-head RMSNorm, RoPE (and the quantisation) into one reduction
kernel, but it ran at ~0.9 TB/s: 94 us per single block for q and k together at 1024x1024
(H200), plus, in a double block, the copy that joins the text's and the image's q / k first.
Here each program normalises and rotates HEADS head rows of TOKENS tokens in registers: the
input read once, from the text's or the image's tensor as the token falls (so no joined copy is
made), the output written once, each token's RoPE row read once for all of its heads. The fp8
version took 24.5 us a call on that shape (2.79 ms for the step's 114 calls); the fp8 +
fp8-attention step went from 76.2 to 73.9 ms (CUDA graphs and modulation tables; H200, same run;
benchmarks/NOTES.md). In bf16 the compiled step went from 125.4 to 122.1 ms (122.1 -> 121.1 with
CUDA graphs and modulation tables; H200, same process).

The arithmetic is the eager path's (_reference, which CPU and other devices run): RMSNorm in
fp32 rounded once to the input dtype (torch's rms_norm), RoPE in fp32 rounded again
(apply_rope), then for fp8 x * 448 / bound, clamped, to e4m3. The sum of squares' order and
rsqrt differ, which can move a value by a step of the input dtype before RoPE."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from services.denoiser.gelu_fp8 import HAVE_TRITON
from services.denoiser.quant import FP8, FP8_MAX


class Launch:
    """The kernel's shape per program, from benchmarks/kernels.py's sweep (Flux 1024x1024 q, one
    call replayed in a CUDA graph, H200): 8 heads of 1 token on 2 warps 18.2 us for bf16 out and
    18.3 for e4m3, against 24.0 / 22.8 on 4 warps (the earlier default), 17.5-22 us for 2-4 tokens
    per program, and 14.4 / 9.5 us for a plain copy of the same bytes. Earlier versions, e4m3 out:
    32 rows of any tokens per program, 208 us (4,096 values on 128 threads: registers, we
    think); the pairs' partners loaded a second time at col ^ 1, 43 us."""

    heads = 8  # heads of a token per program, which share its RoPE row
    tokens = 1  # tokens per program
    warps = 2


def rms_norm_rope(text: torch.Tensor, image: torch.Tensor, weight_text: torch.Tensor, weight_image: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, eps: float, bound: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE(RMSNorm(x)) of the joint x = [text; image] along the sequence, [B, St + Si, H, D]
    (contiguous), each part with its own norm weight (Flux's joint attention; a single block
    passes an empty `text`). text [B, St, H, D] and image [B, Si, H, D]: q or k before their
    norm, any strides with D contiguous; cos / sin [St + Si, D] fp32 (interleaved pairs).
    `bound` (0-d fp32, an upper bound on the result's magnitude): the result times 448 / bound
    in e4m3, for fp8 attention; None: in the input dtype."""
    return torch.ops.ditserve.rms_norm_rope(text, image, weight_text, weight_image, cos, sin, eps, bound)


@torch.library.custom_op("ditserve::rms_norm_rope", mutates_args=())
def _rms_norm_rope(text: torch.Tensor, image: torch.Tensor, weight_text: torch.Tensor, weight_image: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, eps: float, bound: torch.Tensor | None) -> torch.Tensor:
    b, split, h, d = text.shape
    seq = split + image.shape[1]
    if not (image.is_cuda and HAVE_TRITON and text.stride(-1) == 1 and image.stride(-1) == 1
            and d in (16, 32, 64, 128, 256)):
        return _reference(text, image, weight_text, weight_image, cos, sin, eps, bound)
    out = torch.empty((b, seq, h, d), dtype=image.dtype if bound is None else FP8, device=image.device)
    if b * seq * h:
        import triton

        cos, sin = cos.contiguous(), sin.contiguous()
        text = text if split else image  # (an empty text is never read; any valid pointer will do)
        _kernel()[(triton.cdiv(b * seq, Launch.tokens), triton.cdiv(h, Launch.heads))](
            text, image, weight_text, weight_image, cos, sin, bound if bound is not None else cos, out,
            b * seq, seq, h, split, text.stride(0), text.stride(1), text.stride(2),
            image.stride(0), image.stride(1), image.stride(2), eps,
            D=d, HEADS=Launch.heads, TOKENS=Launch.tokens, QUANT=bound is not None, num_warps=Launch.warps)
    return out


@_rms_norm_rope.register_fake
def _(text, image, weight_text, weight_image, cos, sin, eps, bound):
    b, split, h, d = text.shape
    return image.new_empty((b, split + image.shape[1], h, d), dtype=image.dtype if bound is None else FP8)


def _reference(text, image, weight_text, weight_image, cos, sin, eps, bound) -> torch.Tensor:
    from services.denoiser.attention_fp8 import _quantise_bounded
    from services.denoiser.models.flux import apply_rope  # the interleaved-pair RoPE

    d = image.shape[-1]
    parts = [F.rms_norm(p, (d,), w, eps) for p, w in ((text, weight_text), (image, weight_image)) if p.shape[1]]
    out = apply_rope(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], cos, sin).contiguous() if parts \
        else image.new_empty(image.shape)
    return out if bound is None else _quantise_bounded(out, bound)[0]


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rope_kernel(text_ptr, image_ptr, wt_ptr, wi_ptr, cos_ptr, sin_ptr, bound_ptr, out_ptr,
                             tokens, seq, heads, split, t_stride_b, t_stride_s, t_stride_h,
                             i_stride_b, i_stride_s, i_stride_h, eps,
                             D: tl.constexpr, HEADS: tl.constexpr, TOKENS: tl.constexpr, QUANT: tl.constexpr):
        token = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)  # b * seq + s
        b, s = token // seq, token % seq
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # this program's heads of its tokens
        col = tl.arange(0, D)
        half = tl.arange(0, D // 2)
        valid = (token < tokens)[:, None, None] & (h < heads)[None, :, None]  # [TOKENS, HEADS, 1]
        text = (s < split)[:, None, None]
        # Each token from its part's tensor: two masked loads, one of which reads nothing.
        t_src = text_ptr + (b * t_stride_b + s * t_stride_s)[:, None, None] + h[None, :, None] * t_stride_h
        i_src = image_ptr + (b * i_stride_b + (s - split) * i_stride_s)[:, None, None] + h[None, :, None] * i_stride_h
        x = tl.load(t_src + col[None, None, :], mask=valid & text, other=0.0) \
            + tl.load(i_src + col[None, None, :], mask=valid & ~text, other=0.0)
        dtype = x.dtype
        x = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=2) / D + eps)
        w = tl.where(text, tl.load(wt_ptr + col)[None, None, :], tl.load(wi_ptr + col)[None, None, :]).to(tl.float32)
        n = (x * inv[:, :, None] * w).to(dtype).to(tl.float32)  # nn.RMSNorm's output, in x's dtype
        # The (real, imag) pairs as two [TOKENS, HEADS, D/2] halves, split in registers.
        re, im = tl.split(tl.reshape(n, (TOKENS, HEADS, D // 2, 2)))
        row = (s * D)[:, None, None] + 2 * half[None, None, :]  # one table row for all a token's heads
        c_re, c_im = tl.load(cos_ptr + row), tl.load(cos_ptr + row + 1)
        s_re, s_im = tl.load(sin_ptr + row), tl.load(sin_ptr + row + 1)
        r = tl.interleave(re * c_re - im * s_re, im * c_im + re * s_im)  # apply_rope, pair by pair
        r = r.to(dtype)  # apply_rope's output, in x's dtype
        if QUANT:
            scale = 448.0 / tl.maximum(tl.load(bound_ptr).to(tl.float32), 1e-12)
            r = tl.minimum(tl.maximum(r.to(tl.float32) * scale, -448.0), 448.0)
        dst = out_ptr + ((token * heads)[:, None, None] + h[None, :, None]) * D + col[None, None, :]
        tl.store(dst, r.to(out_ptr.dtype.element_ty), mask=valid)

    return rms_norm_rope_kernel


assert FP8_MAX == 448.0  # the kernel's literal
