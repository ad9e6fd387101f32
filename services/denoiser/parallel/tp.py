"""Tensor-parallel linear layers. Model files pick these classes; with no tp group they are plain
nn.Linear. The only collective of a tensor-parallel block is the all-reduce in
RowParallelLinear.forward.

Column-parallel: output features split over the group (input replicated, output sharded).
Row-parallel: input features split (input sharded, partial products summed). A Flux attention
or MLP is column -> (local work on whole heads / hidden units) -> row, so one all-reduce each.
AdaLN modulation and QK norms stay replicated, as in diffusers' plan: modulation indexes the
full hidden dimension, and the norms act on one head at a time."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from services.denoiser.lora.apply import add_lora
from services.denoiser.quant import linear


class TensorParallel:
    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def split(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"tensor parallelism {self.size} does not divide {what} ({n})")
        return n // self.size


class ColumnParallelLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, tp: TensorParallel | None = None, bias: bool = True):
        self.tp = tp
        super().__init__(in_features, tp.split(out_features, "output features") if tp else out_features, bias=bias)

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return full
        n = full.shape[0] // self.tp.size
        return full[self.tp.rank * n : (self.tp.rank + 1) * n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, getattr(self, "weight_scale", None))
        return add_lora(self, [x], y)  # unmerged LoRA (lora/apply.py)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(tanh)(x W^T + b). On CUDA in bf16/fp16, cuBLASLt applies the GELU in the GEMM's
        epilogue (in fp32, before rounding) instead of a second pass over the [tokens, 4 x dim]
        output; inductor keeps the call as is (it has no decomposition for it)."""
        lora = getattr(self, "lora_down", None) is not None  # the update goes in before the GELU
        if x.is_cuda and self.bias is not None and self.weight.dtype in (torch.bfloat16, torch.float16) and not lora:
            y = torch._addmm_activation(self.bias, x.reshape(-1, x.shape[-1]), self.weight.t(), use_gelu=True)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return F.gelu(self(x), approximate="tanh")


class RowParallelLinear(nn.Linear):
    """`blocks`: the input is a concatenation of independently sharded pieces of these full sizes
    (Flux's single-stream proj_out sees [attention output | MLP hidden])."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel | None = None, bias: bool = True,
                 blocks: list[int] | None = None):
        self.tp = tp
        self.blocks = blocks or [in_features]
        local_in = sum(tp.split(b, "input features") for b in self.blocks) if tp else in_features
        super().__init__(local_in, out_features, bias=bias)

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        if self.tp is None or name == "bias":
            return full
        pieces, start = [], 0
        for b in self.blocks:
            n = b // self.tp.size
            pieces.append(full[:, start + self.tp.rank * n : start + (self.tp.rank + 1) * n])
            start += b
        return torch.cat(pieces, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pieces([x])

    def forward_pieces(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """forward(torch.cat(pieces, -1)) without building the concatenation: one GEMM per piece
        of the input (the pieces of `blocks`), summed. Saves Flux's single blocks a copy of
        [tokens, 5 x dim] per layer; the sum fuses into the residual add that follows."""
        scale = getattr(self, "weight_scale", None)
        weights = self.weight.split([p.shape[-1] for p in pieces], dim=1) if len(pieces) > 1 else [self.weight]
        # Without TP the bias rides in the first GEMM's epilogue; with TP it is added once, after
        # the all-reduce of the partial products.
        bias = self.bias if self.tp is None else None
        y = linear(pieces[0], weights[0], bias, scale)
        for piece, weight in zip(pieces[1:], weights[1:]):
            y = y + linear(piece, weight, None, scale)
        y = add_lora(self, pieces, y)  # partial under TP, like y
        if self.tp is None:
            return y
        dist.all_reduce(y, group=self.tp.group)
        return y + self.bias if self.bias is not None else y


def shard_state_dict(module: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's full tensors -> this rank's pieces, for every parallel layer in `module`."""
    out = dict(full)
    for prefix, sub in module.named_modules():
        if isinstance(sub, (ColumnParallelLinear, RowParallelLinear)):
            for name in ("weight", "bias"):
                key = f"{prefix}.{name}"
                if key in out:
                    out[key] = sub.shard(name, out[key]).contiguous()
    return out
