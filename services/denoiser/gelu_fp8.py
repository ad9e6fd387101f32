"""GELU(tanh) and the fp8 row quantisation of its output in one pass: the input of an fp8 MLP
down-projection (`--dit-precision fp8`).

Compiled, inductor already fuses F.gelu + quantize_rows into one kernel, but that kernel loops
over each row twice (once for the row's amax, once to scale and cast) and on Flux's [4608, 12288]
MLP hidden state it ran at 0.18 ms, ~25% of the H200's memory bandwidth: 9.7 of the fp8 step's
91 ms (benchmarks/NOTES.md). Here one program holds a whole row in registers: the bf16 row is
read once, the e4m3 row and its scale written once (0.085-0.09 ms on that shape; the fp8 step went
from 92.5 to 90.3 ms, 85.8 with CUDA graphs, H200).

The arithmetic is the eager path's, quantize_rows(F.gelu(y, approximate="tanh")): GELU in fp32,
rounded to the input dtype as F.gelu's output is, then amax / 448 as the row scale. Rows longer
than MAX_ROW (whose registers would spill) and devices without Triton take that path itself."""

from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import torch
import torch.nn.functional as F

from services.denoiser.quant import FP8, quantize_rows

MAX_ROW = 16384  # elements of one row held by one program (16 warps x 32 values each)
# Approximate reciprocals in place of IEEE divisions: 85-86 us against 89-90 on [4608, 12288]
# with the same e4m3 output there (benchmarks/kernels.py, H200); a plain copy of its bytes takes
# 42 us. The rest of the gap is not the arithmetic: the number of warps changes nothing either.
FAST = True
# Read once here, not under torch.compile (dynamo cannot trace the import machinery).
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def gelu_quantize_rows(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y [M, K] (bf16 / fp16) -> (e4m3 values of GELU(tanh)(y) [M, K], fp32 scales [M, 1])."""
    if y.is_cuda and y.shape[-1] <= MAX_ROW and HAVE_TRITON:
        return torch.ops.ditserve.gelu_quantize_rows(y)
    return quantize_rows(F.gelu(y, approximate="tanh"))


# An opaque op to torch.compile (inductor would otherwise split the work back into its own
# two-loop kernel); registered here, its Triton kernel built on first use.
@torch.library.custom_op("ditserve::gelu_quantize_rows", mutates_args=())
def _gelu_quantize_rows(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = y if y.stride(-1) == 1 else y.contiguous()
    rows, cols = y.shape
    q = torch.empty((rows, cols), dtype=FP8, device=y.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=y.device)
    if rows:
        import triton

        block = triton.next_power_of_2(cols)
        _kernel()[(rows,)](y, q, scale, cols, y.stride(0), BLOCK=block, FAST=FAST,
                           num_warps=warps(block))
    return q, scale


def warps(block: int) -> int:
    """Warps per program for rows of `block` values (benchmarks/kernels.py sweeps this)."""
    return min(16, max(4, block // 1024))


@_gelu_quantize_rows.register_fake
def _(y):
    return y.new_empty(y.shape, dtype=FP8), y.new_empty((y.shape[0], 1), dtype=torch.float32)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_quantize_rows_kernel(y_ptr, q_ptr, scale_ptr, cols, y_row_stride, BLOCK: tl.constexpr,
                                  FAST: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(y_ptr + row * y_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(u) = 1 - 2 / (e^(2u) + 1):
        # exact at both ends (e^(2u) overflowing to inf gives 1), no libdevice needed.
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        if FAST:  # an approximate reciprocal: no IEEE division per value
            g = 0.5 * x * (2.0 - tl.fdiv(2.0, tl.exp(2.0 * u) + 1.0, ieee_rounding=False))
        else:
            g = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        g = g.to(y_ptr.dtype.element_ty).to(tl.float32)  # F.gelu's output is in the input dtype
        scale = tl.maximum(tl.max(tl.abs(g), axis=0), 1e-12) / 448.0  # masked lanes are GELU(0) = 0
        if FAST:  # one division per row, a product per value
            q = tl.minimum(tl.maximum(g * (1.0 / scale), -448.0), 448.0)
        else:
            q = tl.minimum(tl.maximum(g / scale, -448.0), 448.0)
        tl.store(q_ptr + row * cols + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)

    return gelu_quantize_rows_kernel


class PendingGelu(NamedTuple):
    """GELU(tanh) of `pre`, not applied yet: what an fp8 up-projection hands the down-projection
    after it (ColumnParallelLinear.forward_gelu(lazy=True) -> RowParallelLinear), which applies
    it in the kernel that quantises its own input."""

    pre: torch.Tensor


def materialise(piece):
    """A PendingGelu as the tensor it stands for; anything else as it is."""
    return F.gelu(piece.pre, approximate="tanh") if isinstance(piece, PendingGelu) else piece
