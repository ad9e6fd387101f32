"""CUDA graphs of whole DiT forwards: one launch per forward instead of thousands.

A compiled Flux forward launches ~1,500 kernels from Python, plus, on a parallel replica, two
NCCL all-to-alls per block that each pass through c10d's bookkeeping. On one GPU the kernels are
long enough to hide that; split over four GPUs they are not, and a step's time then depends on
how fast the host's cores happen to be. A captured forward replays the same kernels and
collectives (NCCL supports capture) with no host work in between.

One graph per input signature (shapes, dtypes, which optional inputs are present, and whatever
the caller says the forward depends on besides its tensors: the runner passes the model object).
Inputs are copied into the graph's static buffers (contiguous, whatever the caller's strides)
before each replay, and the output is copied out after it, so callers see ordinary tensors.

All graphs share one memory pool. That is safe here because nothing a graph produced is read
after another graph has replayed: each replay's output is cloned before anything else runs, and
the static inputs live outside the pool."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from services.denoiser.compile import should_compile


class CaptureError(RuntimeError):
    """A forward that runs but cannot be captured (a host sync, a CPU tensor, an op CUDA graphs
    do not allow): its runner goes on without graphs."""


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor | None]
    output: torch.Tensor


class ForwardGraphs:
    def __init__(self, device: torch.device, max_graphs: int = 8, warmup: int = 2):
        self.device, self.max_graphs, self.warmup = device, max_graphs, warmup
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._pool = None
        self.captures = 0  # how many signatures have been captured (tests read it)
        # abandon() comes from another thread (runtime/rank_group.py's death watch); the lock
        # keeps it from destroying a graph in the middle of a launch (held for the host side of
        # a launch only, never while the device runs).
        self._launch = threading.Lock()
        self.abandoned = False
        self._replayed: torch.cuda.Event | None = None  # recorded after each launch (replay_ended)

    def run(self, fn: Callable[..., torch.Tensor], args: list[torch.Tensor | None], depends_on: Hashable) -> torch.Tensor:
        """fn(*args), replayed from the graph captured for this signature (captured now if new).
        `fn` must do the same device work for every call with the same signature: no host syncs,
        no data-dependent control flow."""
        key = (depends_on, tuple(None if a is None else (tuple(a.shape), a.dtype) for a in args))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(fn, args)
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)  # its memory returns to the shared pool
        else:
            self._graphs.move_to_end(key)
            for static, a in zip(entry.inputs, args):
                if a is not None:
                    static.copy_(a)
        with self._launch:
            if self.abandoned:
                raise RuntimeError("this replica's communicators were aborted (a rank died): no more replays")
            entry.graph.replay()
            if self._replayed is None:
                self._replayed = torch.cuda.Event()
            self._replayed.record()
        return entry.output.clone()

    def replay_ended(self, timeout_s: float) -> bool:
        """Whether the last launch has finished on the device, waiting up to `timeout_s` for it
        (polled: from the death watch's thread, which must not block on a stuck device)."""
        deadline = time.monotonic() + timeout_s
        while self._replayed is not None and not self._replayed.query():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        """No launch or capture from now on (they raise): a rank died (runner.abandon_graphs),
        and the replay under way is to be the last, so that replay_ended waits for that one."""
        with self._launch:
            self.abandoned = True

    def abandon(self) -> None:
        """From another thread, while a replay may be stuck on a dead rank's collective: destroy
        every graph, so that NCCL's abort, which waits for the graphs' references on its
        communicators, can return. Destroying waits for the device (2x H200: CUDAGraph.reset sat
        behind the stuck kernel), which the abort, run at the same time (runtime/rank_group.py's
        _DeathWatch), frees. Later replays and captures raise."""
        with self._launch:
            self.abandoned = True
            self._destroy()

    def clear(self) -> None:
        """Destroy every graph and its memory. A graph with NCCL collectives in it holds a
        reference on their communicator, and NCCL's abort / destroy of that communicator waits
        for the reference to go: a two-rank replica's close hung there (H200, both ranks in
        abort for 120 s) until its graphs were cleared first. The synchronize lets the driver
        release what the destroyed graphs held."""
        try:
            self._destroy()
        finally:
            self._pool = None
            torch.cuda.synchronize(self.device)

    def _destroy(self) -> None:
        """Every graph, even where one fails to go (a CUDA error after a rank died): each one kept
        holds its communicators' references, which NCCL's abort waits for."""
        entries, failure = list(self._graphs.values()), None
        self._graphs.clear()
        for entry in entries:
            try:
                entry.graph.reset()
            except RuntimeError as exc:
                failure = exc
        if failure is not None:
            raise failure

    def _capture(self, fn, args) -> _Graph:
        if self.abandoned:
            raise RuntimeError("this replica's communicators were aborted (a rank died): no more captures")
        static = [None if a is None else torch.empty(a.shape, dtype=a.dtype, device=a.device).copy_(a) for a in args]
        # Warm up on a side stream, as capture requires: compiles, autotunes and creates the
        # NCCL communicators before anything is recorded.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                output = fn(*static)
        except RuntimeError as exc:  # the forward ran above, uncaptured: only capturing it failed
            # torch.cuda.graph's exit skips restoring the stream when capture_end raises: the plain
            # forwards that follow would run on the capture stream, unordered with this one's work.
            torch.cuda.set_stream(stream)
            _stop_routing_to_pool(self.device, self._pool)
            raise CaptureError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        self.captures += 1
        return _Graph(graph, static, output)


def _stop_routing_to_pool(device: torch.device, pool) -> None:
    """After a failed capture: torch's capture_end raises at cudaStreamEndCapture, before it tells
    the caching allocator that the capture's allocations no longer go to the graph pool. The
    allocator then keeps a capture "under way" whose stream filter points into the dead graph
    object, and its INTERNAL ASSERT (captures_underway.empty()) ended a process that had fallen
    back to plain forwards (2x H200, rc 134 at exit). Where capture_end got that far itself, the
    call finds nothing under way and raises, which is fine."""
    try:
        torch._C._cuda_endAllocateToPool(device.index if device.index is not None else torch.cuda.current_device(),
                                         pool)
    except (RuntimeError, AttributeError):
        pass


def should_graph(config, device: torch.device, multi_rank: bool, variable_text: bool = False) -> bool:
    """CUDA graphs of whole forwards (config.cuda_graphs; see its comment): None = on for a
    compiled multi-rank or fp8 (linears or attention) replica on CUDA without layerwise offload.
    For fp8 on one GPU (5% a step) only where the prompt reaches the DiT at one length: a model
    whose text length varies per prompt (spec.variable_text) would capture a graph per length."""
    if device.type != "cuda":
        return False
    if config.cuda_graphs is not None:
        return config.cuda_graphs
    # fp8 attention adds host work per attention (attention_fp8.py's cuDNN call): at 1024x1024 it
    # lost 3 ms a step without graphs and gained 4 ms with them (H200).
    fp8 = config.precision == "fp8" or config.attention_precision == "fp8"
    host_bound = multi_rank or (fp8 and not variable_text)
    return host_bound and should_compile(config.compile, device) and not config.layerwise_offload
