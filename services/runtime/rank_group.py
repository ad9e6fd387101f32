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

Requests reach the followers over a gloo "control" group that never times out: a replica
may sit idle for hours between requests, and a follower waiting on the compute group instead
would hit its collective timeout after COLLECTIVE_TIMEOUT_S idle and die (it did, before).

Failure: before each request rank 0 checks that every follower is alive; a dead follower fails
the request with StageUnavailableError and the group is rebuilt (new processes, new process
group) on the next request. A rank that dies mid-request makes rank 0's collectives fail instead
of hanging: with gloo at once (its connections drop; tested in tests/cpu/test_parallel_e2e.py);
with NCCL, whose kernels would spin on a dead peer until the watchdog's timeout, a watch thread
polls the followers while a request runs and aborts the communicators when one dies, which
ends the stuck kernels (tests/gpu: passed on 2x H200 without CUDA graphs, and on 2x H100 with
them, see _DeathWatch). On rank 0 NCCL's watchdog is set to abort without ending the process
(TORCH_NCCL_ASYNC_ERROR_HANDLING=2): torch's default (3) would end the whole worker at a
timed-out collective rather than fail its request. Followers keep the default: one whose
collective failed ends, and rank 0 replaces every follower when it rebuilds anyway."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.runtime.config import StageConfig
from services.runtime.errors import RequestCancelledError, StageUnavailableError

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 120  # a collective inside a request (first-call compiles included)
JOIN_TIMEOUT_S = 600  # ranks joining: process start, imports, a Ray actor's scheduling
DEATH_POLL_S = 0.5  # how often rank 0 looks at its followers while an NCCL request runs
RECOVERY_S = 60  # for aborting the communicators after a death, before the process gives up
PROGRESS_S = 10  # how often a recovery still under way is logged
_IDLE_FOREVER = datetime.timedelta(days=365)
_control = None  # this process's control group: requests, and the signal to leave


@dataclass(frozen=True)
class RankSpec:
    """What every rank of a group runs: `build(config)` once (a module-level function, so that it
    pickles to spawned processes and Ray actors), then `stage.<method>(request)` per request."""

    role: str  # "denoiser", "encoder": names logs, errors and Ray's rank actors
    build: Callable[[StageConfig], Any]
    method: str
    config: StageConfig
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S

    def on_gpu(self, gpu_index: int) -> RankSpec:
        """On CUDA, a rank uses GPU `gpu_index` of the GPUs its process sees."""
        device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda"):
            device = f"cuda:{gpu_index}"
        return RankSpec(self.role, self.build, self.method, self.config.model_copy(update={"device": device}),
                        self.collective_timeout_s)


def _init(rank: int, world: int, address: str, device: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    global _control
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
        if rank == 0:  # abort, keep the process (see the module docstring); followers keep torch's
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    # The store has its own timeout: joining may take longer than a collective may.
    host, port = address.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _control = dist.new_group(backend="gloo", timeout=_IDLE_FOREVER)


def follower_main(rank: int, world: int, address: str, spec: RankSpec) -> None:
    """The life of rank 1..N-1: join the group, build the stage, follow rank 0's requests.
    `spec.config.device` is already this rank's device (see RankSpec.on_gpu)."""
    _init(rank, world, address, spec.config.device, spec.collective_timeout_s)
    stage = spec.build(spec.config)
    call = getattr(stage, spec.method)
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=_control)
        except (RuntimeError, dist.DistBackendError):  # rank 0 went away: nothing left to follow
            log.warning("%s rank %d: rank 0 is gone; leaving", spec.role, rank)
            break
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


def _abort_communicators() -> None:
    """Abort every NCCL communicator of this process (the default group and the mesh's groups),
    from another thread than the one blocked on them: NCCL kernels waiting on a dead peer see the
    abort and end, and the blocked call raises. The groups stay registered; leave_group tears
    them down when the replica is rebuilt.

    Each group's abort runs in a thread of its own: NCCL's abort of a communicator waits until
    every CUDA graph that captured work on it has finished and been released, and a graph's
    replay can be stuck on another communicator's kernel, which only that one's abort ends. One
    after the other, the first abort could wait for a replay that the second would have freed."""
    aborts = [threading.Thread(target=_logged(pg.abort, f"nccl-abort-{i}"), name=f"nccl-abort-{i}", daemon=True)
              for i, pg in enumerate(list(dist.distributed_c10d._world.pg_names)) if pg is not _control]
    for thread in aborts:
        thread.start()
    for thread in aborts:
        thread.join()


class _DeathWatch:
    """While an NCCL request runs on rank 0: a follower found dead aborts the communicators, so
    that the request fails now rather than at the watchdog's timeout.

    With CUDA graphs (on by default for multi-rank replicas) the abort alone deadlocked (2x H200):
    NCCL's abort sets the flag that ends kernels stuck on the dead peer, then waits for the graphs
    holding its communicators, while rank 0's thread, unstuck, blocked entering its next
    collective on the lock the abort holds. So the abort runs in its own thread and, beside it,
    the stage's `on_rank_death()` destroys the graphs (which waits for the device, which the
    abort's flag frees). That passed tests/gpu's dead-rank test with graphs (2x H100). If the two
    have not finished after RECOVERY_S, the process ends, as torch's own NCCL error handling would have ended it,
    so that the worker's supervisor (Ray Serve, Kubernetes) restarts it rather than it hanging."""

    def __init__(self, ranks, stage, active: bool = True):
        """`active` False (gloo, whose collectives fail by themselves): watches nothing."""
        self.ranks, self.stage, self.fired, self._done = ranks, stage, False, threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rank-death-watch", daemon=True) if active else None

    def __enter__(self):
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(DEATH_POLL_S):
            dead = self.ranks.dead()
            if dead:
                log.error("rank(s) %s died mid-request; aborting the replica's communicators", dead)
                self.fired = True
                targets = {"nccl-abort": _abort_communicators,
                           "release-graphs": getattr(self.stage, "on_rank_death", None)}
                steps = [threading.Thread(target=_logged(fn, name), name=name, daemon=True)
                         for name, fn in targets.items() if fn is not None]
                for step in steps:
                    step.start()
                if not _finish(steps, dead):
                    log.critical("rank 0 could not abort its communicators within %d s of rank(s) %s dying; "
                                 "ending the process so that it is restarted", RECOVERY_S, dead)
                    logging.shutdown()
                    os._exit(70)
                return


_RECOVERY_THREADS = ("nccl-abort", "release-graphs")  # _DeathWatch's threads' names (and nccl-abort-<i>)


def _logged(fn: Callable[[], None], name: str) -> Callable[[], None]:
    """fn, its failure logged: a thread's exception would otherwise reach only stderr, and a
    recovery step that failed leaves the other waiting until RECOVERY_S with nothing said."""
    def run() -> None:
        try:
            fn()
        except Exception:
            log.exception("%s failed while recovering from a rank's death", name)
    return run


def _finish(steps: list[threading.Thread], dead: list[int]) -> bool:
    """Wait up to RECOVERY_S for the recovery's threads, naming every PROGRESS_S the recovery
    threads still running (each group's abort has its own: a recovery that hangs says where);
    whether they all ended."""
    start = time.monotonic()
    deadline, said = start + RECOVERY_S, start
    while (alive := [s for s in steps if s.is_alive()]) and (now := time.monotonic()) < deadline:
        alive[0].join(min(said + PROGRESS_S, deadline) - now)
        if time.monotonic() >= said + PROGRESS_S and any(s.is_alive() for s in steps):
            said = time.monotonic()
            running = [t.name for t in threading.enumerate() if t.name.startswith(_RECOVERY_THREADS)]
            log.warning("rank(s) %s died %.0f s ago; still running: %s", dead, said - start, ", ".join(running))
    return not alive


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
        _init(0, self.world, address, spec.config.device, spec.collective_timeout_s)
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
        watch = _DeathWatch(self.ranks, self.stage, active=dist.get_backend() == "nccl")
        try:
            with watch:
                dist.broadcast_object_list([request], src=0, group=_control)
                result = getattr(self.stage, self.spec.method)(request, *local_args)
        except Exception as exc:
            # A failed collective means a rank is gone; after the watch aborted the communicators
            # whatever the stage raised is that too.
            if not (watch.fired or isinstance(exc, (RuntimeError, dist.DistBackendError))):
                raise
            self.healthy = False
            raise StageUnavailableError(f"{role} replica lost a rank mid-request: {str(exc).splitlines()[0]}") from exc
        if watch.fired:  # it returned, but from aborted collectives: not a result
            self.healthy = False
            raise StageUnavailableError(f"{role} replica lost a rank mid-request")
        return result

    def close(self) -> None:
        """Orderly shutdown: every rank leaves the group together, then the processes end."""
        if dist.is_initialized():
            try:
                dist.broadcast_object_list([None], src=0, group=_control)  # the followers leave theirs too
            except (RuntimeError, dist.DistBackendError):  # one is gone already: leave without it
                log.warning("%s: a rank was gone at close", self.spec.role)
            leave_group(self.stage)
        self.ranks.stop()
