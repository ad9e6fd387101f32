"""Applying LoRA adapters to the DiT: merged into the weights, or per sample at run time.

Merged (one LoRA set for the whole batch): every touched weight becomes W + sum of
strength x scale x up @ down, computed in fp32 and rounded once; the original is kept on the
host (once per module, then reused) so unmerging restores it bit for bit (subtracting the delta
again would not, in bf16). On CUDA that host copy is page-locked, so a restore is a DMA at full
PCIe speed rather than a staged copy from pageable memory (see _host_copy).
A step then costs exactly what it costs without LoRA.

Unmerged (a batch mixing LoRA sets): for every touched linear, the batch's adapters are stacked
per sample into down [B, R, in] and up [B, out, R] (strength x scale folded into up; samples
with fewer or no adapters padded with zeros), and the layer adds  (x @ down^T) @ up^T  with two
batched matmuls: no Python loop over samples, and each sample gets exactly its own adapters'
update (the padding contributes exact zeros).

The per-batch tensors are set on each touched layer as non-persistent buffers `lora_down` /
`lora_up` (None otherwise), which the layers read (parallel/tp.py; a forward hook for the plain
nn.Linear ones). Compiled blocks treat buffers as graph inputs, so they guard only on whether a
layer carries LoRA and on the [B, R] shapes: a new batch with the same shapes reuses the
compiled kernels, and all 38 (19) instances of a block share one graph. (A per-layer key read
inside the block, such as its module path, would specialise the graph per instance: 57
compiles, and dynamo's recompile limit.)"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from services.denoiser.lora.adapter import LoraAdapter

log = logging.getLogger(__name__)


def add_lora(module: nn.Module, pieces: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """y plus the unmerged update of `module` for its input x [B, ..., in], given as pieces of
    its features ([x], or RowParallelLinear.forward_pieces' pieces); y itself without LoRA.
    The up-projection is a plain bmm and the add a separate op on purpose: putting the add in
    the GEMM (baddbmm, beta 1) measured slower on H200, Flux.1-dev 1024x1024, rank 64 (mixed
    batch of 4: +17.3% over no LoRA against +12.1%), since inductor fuses the plain add into
    the kernels around it."""
    down, up = getattr(module, "lora_down", None), getattr(module, "lora_up", None)
    if down is None:  # no LoRA this batch (or a model without prepare_model)
        return y
    downs = down.split([p.shape[-1] for p in pieces], dim=2) if len(pieces) > 1 else [down]
    low = sum(torch.bmm(p.reshape(p.shape[0], -1, p.shape[-1]).to(down.dtype), d.transpose(1, 2))
              for p, d in zip(pieces, downs))
    delta = torch.bmm(low, up.transpose(1, 2))
    return y + delta.reshape(y.shape).to(y.dtype)


# One adapter of a sample: (adapter, strength).
SampleLoras = Sequence[tuple[LoraAdapter, float]]


def _plain_linear_hook(module: nn.Linear, args, output):
    return add_lora(module, [args[0]], output)


def prepare_model(model: nn.Module) -> None:
    """Give every linear empty `lora_down` / `lora_up` buffers, and the plain nn.Linear ones
    (AdaLN modulation, embedders, final projection) a hook that adds the unmerged update; the
    parallel linear classes add it themselves, before their all-reduce."""
    from services.denoiser.parallel.tp import ColumnParallelLinear, RowParallelLinear

    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_buffer("lora_down", None, persistent=False)
            module.register_buffer("lora_up", None, persistent=False)
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
        self._originals: dict[str, torch.Tensor] = {}  # W0 on the host, per module ever merged
        self._merged: set[str] = set()  # modules whose weights differ from W0 now
        self._active: list[nn.Module] = []

    def use(self, per_sample: Sequence[SampleLoras], dtype: torch.dtype) -> None:
        """A batch's adapters (one list per image). One set for the whole batch: merged into the
        weights (no per-step cost; kept for the next batch with the same set). Mixed sets:
        per-sample updates at run time. None at all: the plain weights."""
        if not any(per_sample):
            self.unmerge()
            return
        keys = {tuple((adapter.key, strength) for adapter, strength in loras) for loras in per_sample}
        if len(keys) == 1 and self.can_merge():
            self.merge(keys.pop(), per_sample[0])
        else:
            self.activate(per_sample, dtype)

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
        """Make the weights W0 + the deltas of `loras` (restoring the previous merge first).
        One module at a time, so the fp32 work space is one layer's, not the model's."""
        if key == self.merged_key:
            return
        self.unmerge()
        paths = sorted({p for adapter, _ in loras for p in adapter.weights})
        for path in paths:
            module = self.modules[path]
            # The host copy of W0 is taken once and kept: later switches only copy it back.
            if path not in self._originals:
                self._originals[path] = _host_copy(module.weight)
            merged = module.weight.float()
            for adapter, strength in loras:
                w = adapter.weights.get(path)
                if w is not None:
                    merged += _shard(module, "weight", w.delta(self.device) * strength)
            module.weight.copy_(merged.to(module.weight.dtype))
            self._merged.add(path)
        self.merged_key = key

    @torch.no_grad()
    def unmerge(self) -> None:
        for path in self._merged:  # asynchronous from page-locked memory; stream-ordered before any use
            self.modules[path].weight.copy_(self._originals[path], non_blocking=True)
        self._merged.clear()
        self.merged_key = ()

    # -- unmerged ------------------------------------------------------------------------

    def activate(self, per_sample: Sequence[SampleLoras], dtype: torch.dtype) -> None:
        """Stack the batch's adapters per sample (see the module docstring) onto the layers."""
        self.unmerge()
        self.deactivate()
        paths = sorted({p for loras in per_sample for adapter, _ in loras for p in adapter.weights})
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
            module.lora_down, module.lora_up = down, up
            self._active.append(module)

    @property
    def unmerged(self) -> bool:
        """Per-batch tensors are set on the layers now (a forward reads them)."""
        return bool(self._active)

    def deactivate(self) -> None:
        for module in self._active:
            module.lora_down = module.lora_up = None
        self._active = []


def _host_copy(weight: torch.Tensor) -> torch.Tensor:
    """A host copy of `weight` to restore it from. For a CUDA weight its pages are locked in place
    (cudaHostRegister) rather than allocated pinned, since torch's pinned allocator rounds each
    block up to a power of two (Flux.1-dev's 3072 x 12288 weights: 75 MB -> 128 MB). An adapter
    switch on every block linear of Flux.1-dev (22 GB restored) took 1.93 s from pageable memory
    (H200, an earlier session) and 461 ms from page-locked memory (H200, not the same machine)."""
    if not weight.is_cuda:
        return weight.detach().clone()
    host = torch.empty(weight.shape, dtype=weight.dtype)
    cudart, ptr = torch.cuda.cudart(), host.data_ptr()
    if int(cudart.cudaHostRegister(ptr, host.numel() * host.element_size(), 0)) == 0:
        weakref.finalize(host, cudart.cudaHostUnregister, ptr)
    else:  # e.g. the locked-memory limit: still correct, only slower
        log.warning("could not page-lock a LoRA restore copy; adapter switches will be slower")
    host.copy_(weight.detach())  # synchronous: the merge overwrites the weight next
    return host


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
