"""QK-RMSNorm and RoPE of q or k in one pass, for a rank that attends alone (no sequence-parallel
exchange): out in the model dtype, or quantised to e4m3 for fp8 attention
(`--dit-attention-precision fp8`, at the static scale of attention.rms_norm_bound). The same
kernel writes a Ulysses rank's send buffer (ulysses_pack: q and k normalised and rotated, v
copied, each head into its rank's slot) in forwards replayed from CUDA graphs; with it and
ulysses.py's exchange op the graphed Flux Ulysses-2 step went from 76.9 to 71.3 ms (2x H200,
1024x1024, same call; inductor's norm, RoPE and packing kernels had taken ~8 ms of it).

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
        _launch(text, image, weight_text, weight_image, cos, sin, bound, out, eps, out.stride()[:3], h)
    return out


def _launch(text, image, weight_text, weight_image, cos, sin, bound, out, eps, out_strides, heads_per_rank,
            norm: bool = True) -> None:
    """The kernel over every (token, head) of [text; image] into `out`, whose element (b, s, head, :)
    is at b * out_strides[0] + s * out_strides[1] + (head // heads_per_rank) * out_strides[2] +
    (head % heads_per_rank) * D: one [B, S, H, D] tensor, or the heads dealt out rank by rank
    into a Ulysses exchange's send buffer. `norm` False copies the values as they are (v)."""
    import triton

    b, split, h, d = text.shape
    seq = split + image.shape[1]
    cos, sin = cos.contiguous(), sin.contiguous()
    text = text if split else image  # (an empty text is never read; any valid pointer will do)
    _kernel()[(triton.cdiv(b * seq, Launch.tokens), triton.cdiv(h, Launch.heads))](
        text, image, weight_text, weight_image, cos, sin, bound if bound is not None else cos, out,
        b * seq, seq, h, split, text.stride(0), text.stride(1), text.stride(2),
        image.stride(0), image.stride(1), image.stride(2), *out_strides, heads_per_rank, eps,
        D=d, HEADS=Launch.heads, TOKENS=Launch.tokens, QUANT=bound is not None, NORM=norm, num_warps=Launch.warps)


@_rms_norm_rope.register_fake
def _(text, image, weight_text, weight_image, cos, sin, eps, bound):
    b, split, h, d = text.shape
    return image.new_empty((b, split + image.shape[1], h, d), dtype=image.dtype if bound is None else FP8)


def ulysses_pack(q: tuple[torch.Tensor, torch.Tensor], k: tuple[torch.Tensor, torch.Tensor],
                 v: tuple[torch.Tensor, torch.Tensor], weights_q: tuple[torch.Tensor, torch.Tensor],
                 weights_k: tuple[torch.Tensor, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float,
                 ranks: int) -> torch.Tensor:
    """A Ulysses rank's send buffer [ranks, S, B, 3, H / ranks, D] (parallel/ulysses.py's layout:
    rank j's heads of q, k and v, token-major) of RoPE(RMSNorm(q)), RoPE(RMSNorm(k)) and v, each
    given as its (text, image) parts [B, St | Si, H, D] as rms_norm_rope takes them. On CUDA the
    kernel writes the buffer directly, three launches (the compiled alternative, inductor's
    norm + RoPE + packing, ran at a fraction of memory bandwidth); elsewhere the eager ops."""
    return torch.ops.ditserve.ulysses_pack(*q, *k, *v, *weights_q, *weights_k, cos, sin, eps, ranks)


@torch.library.custom_op("ditserve::ulysses_pack", mutates_args=())
def _ulysses_pack(q_text: torch.Tensor, q_image: torch.Tensor, k_text: torch.Tensor, k_image: torch.Tensor,
                  v_text: torch.Tensor, v_image: torch.Tensor, wq_text: torch.Tensor, wq_image: torch.Tensor,
                  wk_text: torch.Tensor, wk_image: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                  ranks: int) -> torch.Tensor:
    parts = ((q_text, q_image), (k_text, k_image), (v_text, v_image))
    b, split, h, d = q_text.shape
    seq = split + q_image.shape[1]
    if not (q_image.is_cuda and HAVE_TRITON and d in (16, 32, 64, 128, 256)
            and all(t.stride(-1) == 1 for pair in parts for t in pair)):
        q = _reference(q_text, q_image, wq_text, wq_image, cos, sin, eps, None)
        k = _reference(k_text, k_image, wk_text, wk_image, cos, sin, eps, None)
        v = torch.cat([v_text, v_image], dim=1) if split else v_image
        return torch.stack([q, k, v], dim=2).view(b, seq, 3, ranks, h // ranks, d).permute(3, 1, 0, 2, 4, 5) \
            .contiguous()
    send = q_image.new_empty((ranks, seq, b, 3, h // ranks, d))
    if b * seq * h:
        for slot, (text, image), weights in ((0, parts[0], (wq_text, wq_image)), (1, parts[1], (wk_text, wk_image)),
                                             (2, parts[2], (wq_text, wq_image))):
            out = send[:, :, :, slot]  # [ranks, S, B, h, D]
            _launch(text, image, *weights, cos, sin, None, out, eps, (out.stride(2), out.stride(1), out.stride(0)),
                    h // ranks, norm=slot < 2)
    return send


@_ulysses_pack.register_fake
def _(q_text, q_image, k_text, k_image, v_text, v_image, wq_text, wq_image, wk_text, wk_image, cos, sin, eps, ranks):
    b, split, h, d = q_text.shape
    return q_image.new_empty((ranks, split + q_image.shape[1], b, 3, h // ranks, d))


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
                             i_stride_b, i_stride_s, i_stride_h, o_stride_b, o_stride_s, o_stride_rank,
                             heads_per_rank, eps, D: tl.constexpr, HEADS: tl.constexpr, TOKENS: tl.constexpr,
                             QUANT: tl.constexpr, NORM: tl.constexpr):
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
        if NORM:
            dtype = x.dtype
            x = x.to(tl.float32)
            inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=2) / D + eps)
            w = tl.where(text, tl.load(wt_ptr + col)[None, None, :], tl.load(wi_ptr + col)[None, None, :])
            n = (x * inv[:, :, None] * w.to(tl.float32)).to(dtype).to(tl.float32)  # nn.RMSNorm's, in x's dtype
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
        else:
            r = x
        at = (h // heads_per_rank) * o_stride_rank + (h % heads_per_rank) * D
        dst = out_ptr + (b * o_stride_b + s * o_stride_s)[:, None, None] + at[None, :, None] + col[None, None, :]
        tl.store(dst, r.to(out_ptr.dtype.element_ty), mask=valid)

    return rms_norm_rope_kernel


assert FP8_MAX == 448.0  # the kernel's literal
