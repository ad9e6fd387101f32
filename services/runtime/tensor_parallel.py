"""Tensor-parallel linear layers, shared by every stage that shards a model over a rank group
(the DiT's blocks, the T5 text encoder). With no tp group they are plain nn.Linear. The only
collective of a tensor-parallel block is the all-reduce in RowParallelLinear.reduce.

Column-parallel: output features split over the group (input replicated, output sharded).
Row-parallel: input features split (input sharded, partial products summed). An attention or
MLP is column -> (local work on whole heads / hidden units) -> row, so one all-reduce each.

The denoiser subclasses these (services/denoiser/parallel/tp.py) to add fp8 weights and unmerged
LoRA; the sharding and the collective stay here."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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
    """`blocks`: the output is a concatenation of independently sharded pieces of these full sizes
    (Flux.2's fused [q | k | v | MLP gate | MLP up] projection, its SwiGLU's [gate | up]). A rank
    keeps its slice of every piece, in order, so its output has the full layout at 1/tp the width
    and the model splits it the same way with or without TP."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel | None = None, bias: bool = True,
                 blocks: list[int] | None = None):
        self.tp = tp
        self.blocks = blocks or [out_features]
        if sum(self.blocks) != out_features:
            raise ValueError(f"output blocks {self.blocks} do not add up to {out_features} output features")
        local_out = sum(tp.split(b, "output features") for b in self.blocks) if tp else out_features
        super().__init__(in_features, local_out, bias=bias)

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full weight or bias (or of a LoRA up matrix: rows are outputs)."""
        if self.tp is None:
            return full
        if len(self.blocks) == 1:
            n = full.shape[0] // self.tp.size
            return full[self.tp.rank * n : (self.tp.rank + 1) * n]
        pieces, start = [], 0
        for b in self.blocks:
            n = b // self.tp.size
            pieces.append(full[start + self.tp.rank * n : start + (self.tp.rank + 1) * n])
            start += b
        return torch.cat(pieces, dim=0)


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
        if self.tp is None:
            return F.linear(x, self.weight, self.bias)
        return self.reduce(F.linear(x, self.weight))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Every rank's partial product summed, plus the bias: added once, after the sum (adding
        it on every rank would count it tp times)."""
        dist.all_reduce(partial, group=self.tp.group)
        return partial + self.bias if self.bias is not None else partial


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
