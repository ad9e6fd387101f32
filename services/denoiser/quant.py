"""fp8 (e4m3) linears with row-wise scales: `--dit-precision fp8`.

Weights are quantized once at load, one scale per output feature; activations are quantized
per token at every call, so an outlier token costs precision only in its own row. The product
runs on torch._scaled_mm (Hopper fp8 tensor cores: ~1,050-1,130 TFLOP/s against ~650-720 for
bf16 on Flux's shapes, H200), accumulating in fp32 and writing bf16.

Only the repeated blocks' projections and MLPs (the parallel linear classes) are converted:
they hold >99% of the FLOPs. AdaLN modulation, the embedders and the final projection stay in
the model dtype, since their outputs scale every activation of the block and cost ~1% of the
time. Inside a compiled block the per-token quantization fuses into the kernel that produces
its input (LayerNorm + modulation), so it adds no pass over memory of its own; after a GELU it
runs in gelu_fp8.py's one-pass kernel instead of inductor's two-pass one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Hopper's fast accumulation (fp32 partial sums promoted less often): set from measurement.
FAST_ACCUM = True
PRECISIONS = ("default", "fp8")  # default: the stage dtype (bf16 on GPU)
# The bias goes in the GEMM's epilogue from this many rows on. cuBLASLt (CUDA 13, H200) has no
# row-wise-scaled fp8 algorithm with a bias and fast accumulation for [M <= 33, K 12288] x
# [12288, 3072] (an MLP down-projection on a short prompt's text tokens: Qwen-Image's) and fails
# the call; below this many rows the separate bias add costs nothing anyway.
FUSED_BIAS_ROWS = 256


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 values [M, K], fp32 scales [M, 1]) with x ~= values * scales."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype: torch.dtype,
               bias: torch.Tensor | None = None, quantize=quantize_rows):
    """x [..., K] in the model dtype @ weight [N, K] (e4m3, scales [1, N]) (+ bias) -> [..., N].
    `quantize` turns x's rows into (e4m3 values, scales): quantize_rows, or gelu_fp8.py's kernel
    that applies a pending GELU on the way. On CUDA the bias goes in the GEMM's epilogue (added
    in fp32, before rounding; from FUSED_BIAS_ROWS rows), so the output is final and the kernel
    reading it next needs no bias add of its own."""
    xq, x_scale = quantize(x.reshape(-1, x.shape[-1]))
    # _scaled_mm wants the second operand column-major: weight is [N, K] row-major, so .t() is.
    fused = bias if x.is_cuda and xq.shape[0] >= FUSED_BIAS_ROWS else None
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, bias=fused, out_dtype=out_dtype,
                         use_fast_accum=FAST_ACCUM)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None and fused is None else y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None):
    """F.linear for weights that may be e4m3 (then `scale` is their [1, N] row scales)."""
    if weight.dtype == FP8:
        return fp8_linear(x, weight, scale, x.dtype, bias)
    return F.linear(x, weight, bias)


def quantize_linear_(layer: nn.Linear) -> None:
    """Replace layer.weight by its e4m3 values and add `weight_scale` [1, N] (fp32), in place."""
    w = layer.weight.detach()
    scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """default: nothing to do. fp8: quantize every tensor/sequence-parallel linear of the blocks."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown DiT precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if precision == "fp8":
        from services.denoiser.parallel.tp import ColumnParallelLinear, RowParallelLinear

        for module in model.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                if module.weight.shape[0] % 16 or module.weight.shape[1] % 16:
                    raise ValueError(f"fp8 needs feature sizes divisible by 16, got {tuple(module.weight.shape)}")
                quantize_linear_(module)
    return model
