"""Layerwise weight offload: the DiT's blocks live in host memory and come to the device one
block ahead of use, so the device holds a few blocks' weights instead of all of them.

Copy while computing: while block i computes from its device slot, a side CUDA stream copies
the next `prefetch` blocks into the other slots, wrapping into the next step (step k+1's first
blocks arrive during step k's last). A block's parameters and floating buffers sit in one flat
pinned host buffer per dtype, so bringing it over is one large memcpy, which gets full PCIe
bandwidth (~51 GiB/s measured on H200) where per-tensor copies would not.

When it pays: a block's copy must be covered by the compute before it. At 1024x1024 a Flux.1-dev
double block is ~680 MB bf16, ~13 ms to copy against ~2.2 ms of compute, so the step becomes
copy-bound and offload is only worth it when the weights do not fit otherwise. At 2048x2048
compute per block grows ~4-8x and roughly covers the copy.

Host memory: torch's pinned allocator rounds each allocation up to a power of two unless
PYTORCH_CUDA_ALLOC_CONF sets pinned_max_round_threshold_mb; for Flux.1-dev's per-block
buffers that is ~38 GiB pinned for ~24 GB of weights.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from services.denoiser.compile import repeated_blocks

# Views into a flat buffer start as aligned as a fresh allocation would for vector loads
# (inductor also copies graph inputs that are not 16-byte aligned).
_ALIGN_BYTES = 256


class LayerwiseOffload:
    """Keeps `blocks` (in execution order) in host memory and streams each into a device slot
    just before its forward. Without CUDA the same path runs with synchronous copies.

    Slots are taken in the order copies are issued (copy k goes to slot k mod (prefetch + 1)),
    not by block index: with Flux's 57 blocks and 2 slots, block 56 and the next step's block 0
    would share a slot, and the prefetch of block 0 would overwrite block 56 while it runs.

    The hooks are plain module hooks, run by nn.Module._call_impl. The service compiles
    `block.forward` (not the module), so they stay outside torch.compile and run eagerly;
    a graph only sees parameters already pointing at a device slot."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device, prefetch: int = 1):
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 (blocks copied ahead of the running one), got {prefetch}")
        if not blocks:
            raise ValueError("no blocks to offload")
        self.device = device = torch.device(device)
        self.prefetch = min(prefetch, max(len(blocks) - 1, 1))
        cuda = device.type == "cuda" and torch.cuda.is_available()
        self._stream = torch.cuda.Stream(device) if cuda else None
        with torch.inference_mode(False), torch.no_grad():  # views made here must not be inference tensors
            packed = [_pack(block, device, pin=cuda) for block in blocks]
            # Per block: its params and floating buffers, its flat host buffers, their views there.
            self._tensors = [tensors for tensors, _, _ in packed]
            self._host = [host for _, host, _ in packed]
            self._host_views = [_views(host, layout) for _, host, layout in packed]
            dtypes = {dtype for host in self._host for dtype in host}
            largest = {dtype: max(h[dtype].numel() for h in self._host if dtype in h) for dtype in dtypes}
            self._slots = [
                {dtype: torch.empty(n, dtype=dtype, device=device) for dtype, n in largest.items()}
                for _ in range(self.prefetch + 1)
            ]
            # Per block, per slot: where its tensors sit when the block runs from that slot.
            self._slot_views = [[_views(slot, layout) for slot in self._slots] for _, _, layout in packed]
        if cuda:
            for slot in self._slots:
                for buf in slot.values():
                    # Allocated on the compute stream, written by the copy stream: keep the
                    # allocator from reusing the memory after free until queued copies are done.
                    buf.record_stream(self._stream)
        n_slots = len(self._slots)
        self._copied = [torch.cuda.Event() for _ in range(n_slots)] if cuda else []
        self._freed = [torch.cuda.Event() for _ in range(n_slots)] if cuda else []
        self._queued: deque[tuple[int, int]] = deque()  # (block, slot) copies issued, not yet run
        self._issued = 0  # copies issued so far; the next goes to slot _issued mod n_slots
        self._running_slot = 0
        self._handles = []
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(lambda _m, _a, i=i: self._before(i)))
            self._handles.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self._after(i)))

    @property
    def device_bytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for slot in self._slots for buf in slot.values())

    def remove(self) -> None:
        """Undo: every block's weights back resident on the device, hooks removed, slots freed."""
        for handle in self._handles:
            handle.remove()
        with torch.inference_mode(False), torch.no_grad():
            for tensors, views in zip(self._tensors, self._host_views):
                for t, view in zip(tensors, views):
                    t.data = view.to(self.device, copy=True)
        self._handles, self._tensors, self._host, self._host_views = [], [], [], []
        self._slots, self._slot_views = [], []
        self._queued.clear()

    def _before(self, i: int) -> None:
        if not self._queued or self._queued[0][0] != i:
            self._restart(i)
        _, slot = self._queued.popleft()
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied[slot])
        for t, view in zip(self._tensors[i], self._slot_views[i][slot]):
            t.data = view
        self._running_slot = slot
        # This goes to the slot of the block that ran just before i (see the class docstring).
        self._issue((i + self.prefetch) % len(self._tensors))

    def _after(self, i: int) -> None:
        if self._stream is not None:
            self._freed[self._running_slot].record(torch.cuda.current_stream(self.device))
        for t, view in zip(self._tensors[i], self._host_views[i]):
            t.data = view  # at rest the weights are the host copy, not a slot another block will reuse

    def _restart(self, i: int) -> None:
        """First call, or blocks ran out of order (say a forward raised midway): queue i.. afresh."""
        if self._stream is not None:
            # Copies queued from here on must not overwrite a slot that queued compute still reads.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        self._queued.clear()
        for k in range(self.prefetch):
            self._issue((i + k) % len(self._tensors))

    def _issue(self, block: int) -> None:
        slot = self._issued % len(self._slots)
        self._issued += 1
        if self._stream is not None:
            self._stream.wait_event(self._freed[slot])
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            for dtype, src in self._host[block].items():
                self._slots[slot][dtype][: src.numel()].copy_(src, non_blocking=self._stream is not None)
            if self._stream is not None:
                self._copied[slot].record(self._stream)
        self._queued.append((block, slot))


def _pack(block: nn.Module, device: torch.device, pin: bool):
    """Moves a block's floating params and buffers into one flat host buffer per dtype.
    Returns (those tensors, the buffers, layout [(dtype, offset, shape)]); other buffers go to `device`."""
    unique = list({id(t): t for t in [*block.parameters(), *block.buffers()]}.values())
    for t in unique:
        if not t.is_floating_point():
            t.data = t.data.to(device)
    tensors = [t for t in unique if t.is_floating_point()]
    sizes: dict[torch.dtype, int] = {}
    layout = []
    for t in tensors:
        align = _ALIGN_BYTES // t.element_size()
        offset = -(-sizes.get(t.dtype, 0) // align) * align
        layout.append((t.dtype, offset, t.shape))
        sizes[t.dtype] = offset + t.numel()
    host = {dtype: torch.empty(n, dtype=dtype, pin_memory=pin) for dtype, n in sizes.items()}
    for t, view in zip(tensors, _views(host, layout)):
        view.copy_(t)
        t.data = view  # frees the resident copy, so the host never holds two copies of the blocks
    return tensors, host, layout


def _views(flat: dict[torch.dtype, torch.Tensor], layout) -> list[torch.Tensor]:
    return [flat[dtype][offset : offset + shape.numel()].view(shape) for dtype, offset, shape in layout]


def enable_layerwise_offload(model: nn.Module, device: torch.device, prefetch: int = 1) -> LayerwiseOffload:
    """Offloads the model's block lists (`block_lists`, in execution order); the rest of the
    model is moved to (or stays on) `device`. Offloading first means a model loaded on the host
    never has all its blocks on the device at once."""
    offload = LayerwiseOffload(repeated_blocks(model), device, prefetch)
    for name, child in model.named_children():
        if name not in model.block_lists:
            child.to(device)
    return offload
