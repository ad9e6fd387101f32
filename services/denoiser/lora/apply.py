"""Applying LoRA adapters to the DiT: merged into the weights, or per sample at run time.

Merged (one LoRA set for the whole batch): every touched weight becomes W + sum of
strength x scale x up @ down, computed in fp32 and rounded once; the original is kept on the
host so unmerging restores it bit for bit (subtracting the delta again would not, in bf16).
A step then costs exactly what it costs without LoRA.

Unmerged (a batch mixing LoRA sets): for every touched linear, the batch's adapters are stacked
per sample into down [B, R, in] and up [B, out, R] (strength x scale folded into up; samples
with fewer or no adapters padded with zeros), and the layer adds  (x @ down^T) @ up^T  with two
batched matmuls: no Python loop over samples, and each sample gets exactly its own adapters'
update (the padding contributes exact zeros).

The per-batch tensors live in one process-wide object, ACTIVE, that the linear layers read
(parallel/tp.py, and a forward hook for the plain nn.Linear ones). Its identity never changes,
so compiled blocks guard only on which modules carry LoRA and on the [B, R] shapes: a new batch
with the same shapes reuses the compiled kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from services.denoiser.lora.adapter import LoraAdapter


class ActiveLora:
    def __init__(self):
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def delta(self, path: str, x: torch.Tensor) -> torch.Tensor | None:
        """The unmerged update of module `path` for input x [B, ..., in], or None."""
        pair = self.weights.get(path)
        if pair is None:
            return None
        down, up = pair
        return self._apply(down, up, [x])

    def delta_pieces(self, path: str, pieces: list[torch.Tensor]) -> torch.Tensor | None:
        """The same for an input given as pieces of its features (RowParallelLinear.forward_pieces)."""
        pair = self.weights.get(path)
        if pair is None:
            return None
        return self._apply(*pair, pieces)

    @staticmethod
    def _apply(down: torch.Tensor, up: torch.Tensor, pieces: list[torch.Tensor]) -> torch.Tensor:
        x0 = pieces[0]
        downs = down.split([p.shape[-1] for p in pieces], dim=2) if len(pieces) > 1 else [down]
        low = sum(torch.bmm(p.reshape(p.shape[0], -1, p.shape[-1]).to(down.dtype), d.transpose(1, 2))
                  for p, d in zip(pieces, downs))
        out = torch.bmm(low, up.transpose(1, 2))
        return out.reshape(*x0.shape[:-1], up.shape[1]).to(x0.dtype)


ACTIVE = ActiveLora()

# One adapter of a sample: (adapter, strength).
SampleLoras = Sequence[tuple[LoraAdapter, float]]


def _plain_linear_hook(module: nn.Linear, args, output):
    delta = ACTIVE.delta(module.lora_path, args[0])
    return output if delta is None else output + delta.to(output.dtype)


def prepare_model(model: nn.Module) -> None:
    """Name every linear by its module path (the adapters' keys) and give the plain nn.Linear
    ones (AdaLN modulation, embedders, final projection) a hook that adds the unmerged update;
    the parallel linear classes add it themselves, before their all-reduce."""
    from services.denoiser.parallel.tp import ColumnParallelLinear, RowParallelLinear

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.lora_path = name
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.register_forward_hook(_plain_linear_hook)


def _shard(module: nn.Module, name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a full [out, in]-shaped tensor (tensor parallelism), else itself."""
    shard = getattr(module, "shard", None)
    return shard(name, full) if shard is not None else full


class LoraRunner:
    """Owns the model's LoRA state: what is merged, and the unmerged per-batch tensors."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.modules = dict(model.named_modules())
        prepare_model(model)
        self.merged_key: tuple = ()
        self._originals: dict[str, torch.Tensor] = {}

    # -- merged --------------------------------------------------------------------------

    def can_merge(self) -> bool:
        # fp8 weights would have to be requantised (error on error); offloaded weights live in
        # shared host buffers. Both run unmerged.
        return all(
            not hasattr(m, "weight_scale") and m.weight.device.type == self.device.type
            for m in self.modules.values() if isinstance(m, nn.Linear)
        )

    @torch.no_grad()
    def merge(self, key: tuple, loras: SampleLoras) -> None:
        """Make the weights W0 + the deltas of `loras` (restoring the previous merge first)."""
        if key == self.merged_key:
            return
        self.unmerge()
        deltas: dict[str, torch.Tensor] = {}
        for adapter, strength in loras:
            for path, w in adapter.weights.items():
                d = strength * (w.up.to(self.device, torch.float32) @ w.down.to(self.device, torch.float32)) * w.scale
                deltas[path] = deltas[path] + d if path in deltas else d
        for path, delta in deltas.items():
            module = self.modules[path]
            self._originals[path] = module.weight.detach().to("cpu", copy=True)
            merged = module.weight.float() + _shard(module, "weight", delta)
            module.weight.copy_(merged.to(module.weight.dtype))
        self.merged_key = key

    @torch.no_grad()
    def unmerge(self) -> None:
        for path, original in self._originals.items():
            self.modules[path].weight.copy_(original.to(self.device))
        self._originals.clear()
        self.merged_key = ()

    # -- unmerged ------------------------------------------------------------------------

    def activate(self, per_sample: Sequence[SampleLoras], dtype: torch.dtype) -> None:
        """Stack the batch's adapters per sample (see the module docstring) into ACTIVE."""
        self.unmerge()
        paths = sorted({p for loras in per_sample for adapter, _ in loras for p in adapter.weights})
        weights = {}
        for path in paths:
            module = self.modules[path]
            ranks = [sum(a.weights[path].rank for a, _ in loras if path in a.weights) for loras in per_sample]
            total = max(ranks)
            down = torch.zeros(len(per_sample), total, module.in_features, device=self.device, dtype=dtype)
            up = torch.zeros(len(per_sample), module.out_features, total, device=self.device, dtype=dtype)
            for i, loras in enumerate(per_sample):
                at = 0
                for adapter, strength in loras:
                    w = adapter.weights.get(path)
                    if w is None:
                        continue
                    d, u = _shard_pair(module, w.down.to(self.device), w.up.to(self.device))
                    down[i, at : at + w.rank] = d.to(dtype)
                    up[i, :, at : at + w.rank] = (u.float() * (strength * w.scale)).to(dtype)
                    at += w.rank
            weights[path] = (down, up)
        ACTIVE.weights = weights

    @staticmethod
    def deactivate() -> None:
        ACTIVE.weights = {}


def _shard_pair(module: nn.Module, down: torch.Tensor, up: torch.Tensor):
    """This rank's (down, up) under tensor parallelism: a column-parallel layer owns a slice of
    the output features (so of up's rows), a row-parallel one a slice of the input features (so
    of down's columns; its shard() handles Flux's [attention | MLP] input blocks)."""
    from services.denoiser.parallel.tp import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return down, module.shard("weight", up)
    if isinstance(module, RowParallelLinear):
        return module.shard("weight", down), up
    return down, up
