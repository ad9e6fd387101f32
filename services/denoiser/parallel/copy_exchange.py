"""The Ulysses q/k/v exchange by copy engine, for forwards replayed from CUDA graphs.

NCCL's all-to-all is a kernel: beside a cuBLAS GEMM it waits for the GEMM's SMs and hardly
overlaps (benchmarks/overlap.py, 2x H200, a Flux 1024x1024 Ulysses-2 single block: 97 us alone,
331-338 us beside the 231-us MLP GEMM against 353 one after the other). A copy into a peer's
memory is a cudaMemcpyAsync, run by a copy engine without SMs: 84 us alone, 240 beside the GEMM.
So each rank copies its chunk for rank j straight into j's receive buffer (torch symmetric
memory maps the peers' buffers), from a side stream, then a barrier kernel says that every
chunk has landed; the model puts independent work (a single block's MLP GEMM) between the start
and the wait (ulysses.py's ulysses_post / ulysses_finish).

Two receive slots per size, used alternately. A rank writes slot i % 2 for exchange i only after
the barrier of exchange i - 1, which a peer passes only once its main stream has reached
exchange i - 1, i.e. after its attention of exchange i - 2 read that slot. A graph replays the
slots it captured, so one forward's last exchange and the next forward's first may share a slot:
the first exchange of a forward (begin_forward) first waits at a barrier for every peer to have
finished the previous forward. Buffers are made outside capture (graphs.py warms each forward
up before capturing it) and kept while graphs may hold their addresses.

The barrier is ditserve's own (a one-CTA Triton kernel counting signals in symmetric memory)
rather than symmetric memory's, because it can be released: a rank that dies leaves its peers'
barrier spinning, where NCCL's abort would have ended a stuck NCCL kernel; rank 0's death watch
calls abort_all, which sets the flag that every barrier also watches (runtime/rank_group.py)."""

from __future__ import annotations

import functools
import logging
import uuid

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from services.denoiser.gelu_fp8 import HAVE_TRITON

log = logging.getLogger(__name__)

_enabled = False  # DenoiserOptions.ulysses_exchange == "copy-engine" (use_copy_engine)
_exchanges: dict[str, CopyExchange | None] = {}  # by group name; None: symmetric memory failed there
_retired: list[CopyExchange] = []  # aborted, kept: a graph still replaying may read their memory
_side_streams: dict[int, torch.cuda.Stream] = {}
_set_up_here = False  # a copy-engine exchange has been set up in this process (set_up_here)


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of the device's exchanges (made on first use: a warm-up call, outside capture)."""
    if device.index not in _side_streams:
        _side_streams[device.index] = torch.cuda.Stream(device)
    return _side_streams[device.index]


def use_copy_engine(enabled: bool) -> None:
    """This process's Ulysses exchanges in graphed forwards by copy engine (True) or NCCL, for
    the forwards captured from now on (a replica's stage sets it from its config)."""
    global _enabled
    _enabled = enabled


def exchange_for(group_name: str, device: torch.device) -> CopyExchange | None:
    """The group's copy-engine exchange, or None where it is off or cannot run (no Triton, no
    symmetric memory between these GPUs): then the caller uses NCCL (told once in the latter case)."""
    global _set_up_here
    if not _enabled:
        return None
    if group_name not in _exchanges:
        try:
            if not HAVE_TRITON:
                raise RuntimeError("Triton is not installed")
            _exchanges[group_name] = CopyExchange(group_name, device)
            _set_up_here = True
        except Exception as exc:  # e.g. GPUs without peer access
            log.warning("Ulysses exchanges of group %s go through NCCL: no copy-engine exchange (%s: %s)",
                        group_name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _exchanges[group_name] = None
    return _exchanges[group_name]


def posts_by_copy(group_name: str) -> bool:
    """Whether the group's exchanges are going by copy engine (ulysses_finish then waits for the
    side stream). Makes nothing, unlike exchange_for: after abort_all a finish must not set up a
    new exchange with a dead peer."""
    return _enabled and _exchanges.get(group_name) is not None


def begin_forward(group_name: str) -> None:
    """A forward starts (SequenceParallel.active): its first exchange fences (see the docstring)."""
    exchange = _exchanges.get(group_name)
    if exchange is not None:
        exchange.count = 0


def abort_all() -> None:
    """Release every barrier waiting on a peer, now and from now on (a rank died). Called from the
    death watch's thread while rank 0 may be inside a graph replay. Later exchanges (an unreplayed
    forward still running: a warm-up, a capture) go to NCCL, whose aborted communicator fails
    them at once, rather than setting up a copy-engine exchange with the dead peer."""
    global _enabled, _exchanges
    _enabled = False
    aborted, _exchanges = _exchanges, {}  # one swap: nothing added meanwhile escapes the abort
    exchanges = [e for e in aborted.values() if e is not None]
    _retired.extend(exchanges)
    for exchange in exchanges:
        exchange.abort()


def set_up_here() -> bool:
    """Whether a copy-engine exchange has been set up in this process before. A replica built
    again in it (after a rank died: rank 0 stays, the followers are new processes) then uses
    NCCL (DenoiserGroup._start). Its set-up would hang: torch's symmetric memory names the store
    keys of its rendezvous exchanges by one sequence counter per process (StoreExchange's
    seq_id_), which rank 0 carries on while fresh followers start again at 0, so their keys never
    meet (pytorch/pytorch#196082, a reading of the source; on 2x H200 the rebuilt replica's first
    rendezvous hung on rank 0, and no API resets the counter)."""
    return _set_up_here


def forget_aborted() -> None:
    """Free what abort_all kept, once no graph can replay (the runner destroyed them)."""
    _retired.clear()


def release_all() -> None:
    """Forget every group's buffers once no graph holds them (the runner closed its graphs)."""
    _exchanges.clear()


class CopyExchange:
    """One Ulysses group's receive buffers, barrier counters and abort flag on this rank."""

    def __init__(self, group_name: str, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        group = _resolve_process_group(group_name)
        self.device = device
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.group_name = _symmetric_group(group, self.rank)
        self.buffers: list[tuple[torch.Tensor, object]] = []  # (local flat buffer of two slots, handle)
        self.count = 0  # exchanges since the forward began
        # On the device, so that graph replays keep counting: barriers passed, signals received
        # from each peer (in symmetric memory, peers add to it). The abort flag in page-locked
        # host memory, which kernels read at the same address: abort() sets it without a CUDA
        # call, which could queue behind the stuck work.
        self.passed = torch.zeros(1, dtype=torch.int64, device=device)
        # Made outside inference mode (the forward that makes it runs in it): abort() writes it
        # from the death watch's thread, and an in-place write to an inference tensor outside
        # inference mode raises, which left every barrier spinning and NCCL's abort waiting.
        with torch.inference_mode(False):
            self.stop = torch.zeros(1, dtype=torch.int32).pin_memory()
        self.signals = symm_mem.empty(self.size, dtype=torch.int64, device=device)
        handle = symm_mem.rendezvous(self.signals, self.group_name)
        self.signals.zero_()
        self._signal_handle = handle
        self.peer_signals = torch.tensor(
            [handle.get_buffer(j, (self.size,), torch.int64).data_ptr() for j in range(self.size)],
            dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every rank's counters zeroed before anyone signals

    def post(self, send: torch.Tensor, seq_sizes: list[int]) -> torch.Tensor:
        """Start sending send [n, s, B, 3, h, D] (chunk j to rank j) on the side stream; returns the
        receive slot [S_all, B, 3, h, D], complete once the current stream has waited for the
        side stream (ulysses_finish)."""
        n, s, b, _, h, d = send.shape
        total = sum(seq_sizes)
        need = total * b * 3 * h * d
        buffer, handle = self._buffer(need, send.dtype)
        # Slot k is the buffer's k-th half whatever the size, so that exchanges of different
        # sizes in one forward (Z-Image's per-part layers) never overlap the other slot.
        slot, fence, half = self.count % 2, self.count == 0, buffer.numel() // 2
        self.count += 1
        at = sum(seq_sizes[: self.rank])
        side = side_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            if fence:
                self.barrier()
            for j in range(n):  # this rank's tokens of rank j's heads, into slot `slot` of j's buffer
                peer = handle.get_buffer(j, (2 * half,), send.dtype)[slot * half : slot * half + need]
                peer.view(total, b, 3, h, d)[at : at + s].copy_(send[j])
            self.barrier()
        return buffer[slot * half : slot * half + need].view(total, b, 3, h, d)

    def barrier(self) -> None:
        _barrier_kernel()[(1,)](self.peer_signals, self.signals, self.passed, self.stop.data_ptr(),
                                RANK=self.rank, WORLD=self.size, LANES=max(2, 1 << (self.size - 1).bit_length()),
                                num_warps=1)

    def abort(self) -> None:
        self.stop.fill_(1)  # host memory: the spinning barrier sees it over the bus

    def _buffer(self, need: int, dtype: torch.dtype) -> tuple[torch.Tensor, object]:
        """A buffer of two slots of at least `need` elements each (made on first need, collectively)."""
        for buffer, handle in self.buffers:
            if buffer.numel() >= 2 * need and buffer.dtype == dtype:
                return buffer, handle
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a Ulysses exchange of a new size during CUDA graph capture (its buffer is made "
                               "in the warm-up forward)")
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(2 * need, dtype=dtype, device=self.device)
        self.buffers.append((buffer, symm_mem.rendezvous(buffer, self.group_name)))
        return self.buffers[-1]


def _symmetric_group(group, rank: int) -> str:
    """The group registered again under a name of its own, for symmetric memory, which keeps
    per group name what it first resolved the name to. Written for a replica built again in the
    same process (same group names, new store), whose set-up hung; the hang went on under fresh
    names, and its cause is symmetric memory's per-process counter (set_up_here), so such a
    replica no longer sets up exchanges at all. Kept because it is what ran on the GPUs; a name
    of the group's own should do. The name comes through the group's own store: no collective."""
    from torch._C._distributed_c10d import _register_process_group
    from torch.distributed.distributed_c10d import _get_process_group_store

    store, key = _get_process_group_store(group), f"ditserve-symmetric-name-{group.group_name}"
    if rank == 0:
        store.set(key, f"ditserve-ulysses-{uuid.uuid4().hex}")
    name = store.get(key).decode()
    _register_process_group(name, group)  # what symmetric memory resolves the name to
    return name


@functools.cache
def _barrier_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def waiting(signals_ptr, lanes, peer, target, stop_ptr):
        seen = tl.atomic_add(signals_ptr + lanes, 0, mask=peer, sem="acquire", scope="sys")
        behind = tl.sum((peer & (seen < target)).to(tl.int32), axis=0)
        return (behind > 0) & (tl.load(stop_ptr, volatile=True) == 0)

    @triton.jit
    def barrier(peer_signals_ptr, signals_ptr, passed_ptr, stop_address,
                RANK: tl.constexpr, WORLD: tl.constexpr, LANES: tl.constexpr):
        """Signal every peer (one more in its counter of this rank's signals), then wait until
        every peer has signalled as often as this rank has, or the abort flag is set."""
        target = tl.load(passed_ptr) + 1
        tl.store(passed_ptr, target)
        lanes = tl.arange(0, LANES)
        peer = (lanes < WORLD) & (lanes != RANK)
        address = tl.load(peer_signals_ptr + lanes, mask=peer, other=0)
        remote = address.to(tl.pointer_type(tl.int64)) + RANK
        tl.atomic_add(remote, 1, mask=peer, sem="release", scope="sys")
        stop_ptr = stop_address.to(tl.pointer_type(tl.int32))  # page-locked host memory (UVA)
        while waiting(signals_ptr, lanes, peer, target, stop_ptr):
            pass

    return barrier
