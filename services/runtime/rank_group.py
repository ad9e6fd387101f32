"""One stage replica spread over several ranks (SPMD): the multi-rank denoiser and the
tensor-parallel encoder both run on this.

Rank 0 lives in the caller's process and is what the router talks to; ranks 1..N-1 build the
same stage and make the same call on every request rank 0 broadcasts. They are spawned processes
(one GPU each, of the GPUs this process sees) or, inside a Ray Serve replica that owns a
placement group, Ray actors in that group's bundles 1..N-1 (ray_ranks.py). Only rank 0's result
is returned; the followers' are dropped.
torch.distributed: NCCL with one GPU per rank on CUDA, gloo on CPU (the same code). A group owns
its process's default process group, so one process holds at most one group
(ServeConfig.check_ranks refuses two in one process before anything loads).

Failure: before each request rank 0 checks that every follower is alive; a dead follower fails
the request with StageUnavailableError and the group is rebuilt (new processes, new process
group) on the next request. A rank that dies mid-request makes the others' collectives fail
(at once when its connections drop, at the latest after COLLECTIVE_TIMEOUT_S) instead of hanging:
tested with gloo (tests/cpu/test_parallel_e2e.py). With NCCL it is not yet tested on a GPU, and
torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING (3) ends the process at the watchdog's timeout
rather than failing the collective; collectives inside a CUDA graph are not watched at all, so
there the next watched one (the per-step stop flag) times out behind the stuck graph."""

from __future__ import annotations

import datetime
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.runtime.config import StageConfig
from services.runtime.errors import RequestCancelledError, StageUnavailableError

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 120


@dataclass(frozen=True)
class RankSpec:
    """What every rank of a group runs: `build(config)` once (a module-level function, so that it
    pickles to spawned processes and Ray actors), then `stage.<method>(request)` per request."""

    role: str  # "denoiser", "encoder": names logs, errors and Ray's rank actors
    build: Callable[[StageConfig], Any]
    method: str
    config: StageConfig

    def on_gpu(self, gpu_index: int) -> RankSpec:
        """On CUDA, a rank uses GPU `gpu_index` of the GPUs its process sees."""
        device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda"):
            device = f"cuda:{gpu_index}"
        return RankSpec(self.role, self.build, self.method, self.config.model_copy(update={"device": device}))


def _init(rank: int, world: int, address: str, device: str) -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend, init_method=f"tcp://{address}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def follower_main(rank: int, world: int, address: str, spec: RankSpec) -> None:
    """The life of rank 1..N-1: join the group, build the stage, follow rank 0's requests.
    `spec.config.device` is already this rank's device (see RankSpec.on_gpu)."""
    _init(rank, world, address, spec.config.device)
    stage = spec.build(spec.config)
    call = getattr(stage, spec.method)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:  # shutdown
            break
        try:
            call(box[0])
        except RequestCancelledError:
            pass  # rank 0 stopped the call; every rank stopped at the same step
        except Exception:  # rank 0 reports the request's failure; followers wait for the next one
            log.exception("%s rank %d: request failed", spec.role, rank)
    leave_group(stage)


def leave_group(stage=None) -> None:
    """This process's side of every process group, without waiting on the other ranks: NCCL's
    destroy_process_group tears down in order with its peers, and after a rank died it would
    wait on one that is gone; aborting the communicators does not. Nothing is in flight by then
    (the last request has returned, or failed). gloo's teardown does not wait.

    A stage may hold on to the communicators itself: a CUDA graph with collectives in it keeps
    a reference that NCCL's abort waits for (a two-rank replica's close hung in abort on H200,
    both ranks, until the graphs went first). Its `before_leaving_group()` lets go of them."""
    release = getattr(stage, "before_leaving_group", None)
    if release is not None:
        release()
    if dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()  # every group, the default one included
    else:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ProcessRanks:
    """Ranks 1..N-1 as processes of this one, rank r on GPU r."""

    host = "127.0.0.1"

    def start(self, world: int, address: str, spec: RankSpec) -> None:
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=follower_main, args=(r, world, address, spec.on_gpu(r)), daemon=True)
            for r in range(1, world)
        ]
        for p in self.procs:
            p.start()

    def dead(self) -> list[int]:
        return [i + 1 for i, p in enumerate(self.procs) if not p.is_alive()]

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)

    def kill_rank(self, rank: int) -> None:
        self.procs[rank - 1].kill()


class RankGroup:
    """Rank 0 of a `world`-rank replica. `call(request, *local_args)` runs `spec.method` on every
    rank (`local_args`, e.g. a step callback, on rank 0 only) and returns rank 0's result."""

    def __init__(self, spec: RankSpec, world: int):
        from services.runtime.ray_ranks import placement_group_ranks

        self.spec = spec
        self.world = world
        self.ranks = placement_group_ranks(spec.role) or ProcessRanks()
        self._start()

    def _start(self) -> None:
        address = f"{self.ranks.host}:{_free_port()}"
        self.ranks.start(self.world, address, self.spec)
        spec = self.spec.on_gpu(0)  # rank 0: the first GPU this process sees
        _init(0, self.world, address, spec.config.device)
        self.stage = spec.build(spec.config)
        self.device = self.stage.device
        self.healthy = True

    def _stop(self) -> None:
        self.ranks.stop()
        if dist.is_initialized():
            leave_group(self.stage)

    def call(self, request, *local_args):
        role = self.spec.role
        dead = self.ranks.dead()
        if dead or not self.healthy:
            self._stop()
            self._start()  # the next request gets a fresh replica
            raise StageUnavailableError(f"{role} rank(s) {dead or '?'} died; the replica was restarted")
        try:
            dist.broadcast_object_list([request], src=0)
            return getattr(self.stage, self.spec.method)(request, *local_args)
        except (RuntimeError, dist.DistBackendError) as exc:  # a collective failed: a rank is gone
            self.healthy = False
            raise StageUnavailableError(f"{role} replica lost a rank mid-request: {str(exc).splitlines()[0]}") from exc

    def close(self) -> None:
        """Orderly shutdown: every rank leaves the group together, then the processes end."""
        if dist.is_initialized():
            dist.broadcast_object_list([None], src=0)  # the followers' signal to leave theirs too
            leave_group(self.stage)
        self.ranks.stop()
