"""The DiT's tensor-parallel linears: the shared layers (services/runtime/tensor_parallel.py, which
own the sharding and the one all-reduce) plus what only the denoiser has: fp8 weights
(quant.py), unmerged LoRA (lora/apply.py), the GELU epilogue and split-input GEMMs. Model files
pick these classes; with no tp group they are plain nn.Linear.

AdaLN modulation and QK norms stay replicated, as in diffusers' plan: modulation indexes the
full hidden dimension, and the norms act on one head at a time."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from services.denoiser.gelu_fp8 import PendingGelu, gelu_quantize_rows, materialise
from services.denoiser.lora.apply import add_lora
from services.denoiser.quant import FP8, fp8_linear, linear
from services.runtime import tensor_parallel as base
from services.runtime.tensor_parallel import TensorParallel, shard_state_dict

__all__ = ["AcrossHeadsRMSNorm", "ColumnParallelLinear", "RowParallelLinear", "TensorParallel", "shard_state_dict"]


class ColumnParallelLinear(base.ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, getattr(self, "weight_scale", None))
        return add_lora(self, [x], y)  # unmerged LoRA (lora/apply.py)

    def forward_gelu(self, x: torch.Tensor, lazy: bool = False) -> torch.Tensor | PendingGelu:
        """GELU(tanh)(x W^T + b). On CUDA in bf16/fp16, cuBLASLt applies the GELU in the GEMM's
        epilogue (in fp32, before rounding) instead of a second pass over the [tokens, 4 x dim]
        output; inductor keeps the call as is (it has no decomposition for it).

        `lazy`, for a caller that hands the result straight to a RowParallelLinear: with fp8
        weights on CUDA the GELU is left to that layer (a PendingGelu), which applies it while
        quantising its input (gelu_fp8.py)."""
        if lazy and self.weight.dtype == FP8 and x.is_cuda:
            return PendingGelu(self(x))
        lora = getattr(self, "lora_down", None) is not None  # the update goes in before the GELU
        if x.is_cuda and self.bias is not None and self.weight.dtype in (torch.bfloat16, torch.float16) and not lora:
            y = torch._addmm_activation(self.bias, x.reshape(-1, x.shape[-1]), self.weight.t(), use_gelu=True)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return F.gelu(self(x), approximate="tanh")


class RowParallelLinear(base.RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pieces([x])

    def forward_pieces(self, pieces: list[torch.Tensor | PendingGelu]) -> torch.Tensor:
        """forward(torch.cat(pieces, -1)) without building the concatenation: one GEMM per piece
        of the input (the pieces of `blocks`), summed. Saves Flux's single blocks a copy of
        [tokens, 5 x dim] per layer; the sum fuses into the residual add that follows. A piece
        may be a PendingGelu (see ColumnParallelLinear.forward_gelu)."""
        scale = getattr(self, "weight_scale", None)
        if scale is None or getattr(self, "lora_down", None) is not None:  # LoRA reads the input itself
            pieces = [materialise(p) for p in pieces]
        widths = [(p.pre if isinstance(p, PendingGelu) else p).shape[-1] for p in pieces]
        weights = self.weight.split(widths, dim=1) if len(pieces) > 1 else [self.weight]
        # Without TP the bias rides in the first GEMM's epilogue; with TP `reduce` adds it once,
        # after the all-reduce of the partial products.
        bias = self.bias if self.tp is None else None
        y = _piece_linear(pieces[0], weights[0], bias, scale)
        for piece, weight in zip(pieces[1:], weights[1:]):
            y = y + _piece_linear(piece, weight, None, scale)
        y = add_lora(self, pieces, y)  # partial under TP, like y
        return y if self.tp is None else self.reduce(y)


def _piece_linear(piece, weight, bias, scale):
    if isinstance(piece, PendingGelu):  # fp8 weights: GELU and quantisation in one kernel
        return fp8_linear(piece.pre, weight, scale, piece.pre.dtype, bias, quantize=gelu_quantize_rows)
    return linear(piece, weight, bias, scale)


class AcrossHeadsRMSNorm(nn.Module):
    """RMSNorm over the whole projection (all heads at once): Wan's QK norm.

    Under tensor parallelism a rank projects only its heads, but the statistic spans all of
    them: the sum of squares is all-reduced over the tp group (one [tokens, 1] tensor, tiny next
    to the projection). The weight stays whole and replicated, as every norm's does (so
    shard_state_dict leaves it alone); a rank applies its heads' slice."""

    def __init__(self, dim: int, eps: float, tp: TensorParallel | None):
        super().__init__()
        self.dim, self.eps, self.tp = dim, eps, tp
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        n = x.shape[-1]
        weight = self.weight[self.tp.rank * n : (self.tp.rank + 1) * n]
        # torch's rms_norm arithmetic: fp32 statistic and product, one cast back at the end.
        xf = x.float()
        sum_sq = xf.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(sum_sq, group=self.tp.group)
        return (xf * torch.rsqrt(sum_sq / self.dim + self.eps) * weight).type_as(x)
