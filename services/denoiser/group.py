"""One denoiser replica spread over several ranks (SPMD).

Rank 0 lives in the caller's process and is what the router talks to; ranks 1..N-1 load the same
weights and run the same loop on every request rank 0 broadcasts. They are spawned processes
(one GPU each, of the GPUs this process sees) or, inside a Ray Serve replica that owns a
placement group, Ray actors in that group's bundles 1..N-1 (ray_ranks.py).
torch.distributed: NCCL with one GPU per rank on CUDA, gloo on CPU (the same code).

Failure: before each request rank 0 checks that every follower is alive; a dead follower fails
the request with StageUnavailableError and the group is rebuilt (new processes, new process
group) on the next request. A rank that dies mid-request makes the others' collectives fail
(at once when its connections drop, at the latest after COLLECTIVE_TIMEOUT_S) instead of hanging."""

from __future__ import annotations

import datetime
import logging
import socket
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.denoiser.parallel.mesh import ParallelDegrees, ParallelMesh
from services.runtime.config import DenoiserConfig
from services.runtime.errors import InvalidRequestError, RequestCancelledError, StageUnavailableError
from services.runtime.messages import DenoiseRequest, DenoiseResponse
from services.runtime.registry import resolve

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 120


def _degrees(config: DenoiserConfig) -> ParallelDegrees:
    return ParallelDegrees(cfg=2 if config.cfg_parallel else 1, ring=config.ring_degree, ulysses=config.ulysses_degree,
                           tp=config.tp_size)


def rank_config(config: DenoiserConfig, gpu_index: int) -> DenoiserConfig:
    """On CUDA, a rank uses GPU `gpu_index` of the GPUs its process sees."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        device = f"cuda:{gpu_index}"
    return config.model_copy(update={"device": device})


def _init(rank: int, world: int, address: str, device: str) -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend, init_method=f"tcp://{address}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def follower_main(rank: int, world: int, address: str, config: DenoiserConfig) -> None:
    """The life of rank 1..N-1: join the group, load the weights, follow rank 0's requests.
    `config.device` is already this rank's device (see rank_config)."""
    from services.denoiser.stage import DenoiserStage

    _init(rank, world, address, config.device)
    stage = DenoiserStage(config, mesh=ParallelMesh(_degrees(config), config.device.split(":")[0]))
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:  # shutdown
            break
        try:
            stage.denoise(box[0])
        except RequestCancelledError:
            pass  # rank 0 stopped the loop; every rank stopped at the same step
        except Exception:  # rank 0 reports the request's failure; followers wait for the next one
            log.exception("rank %d: request failed", rank)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ProcessRanks:
    """Ranks 1..N-1 as processes of this one, rank r on GPU r."""

    host = "127.0.0.1"

    def start(self, world: int, address: str, config: DenoiserConfig) -> None:
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=follower_main, args=(r, world, address, rank_config(config, r)), daemon=True)
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


def check_degrees(config: DenoiserConfig) -> None:
    """Refuse, before any process starts, a layout the model cannot be split into."""
    model, _ = resolve(config.model_path, config.backend)
    heads = model.component_config("transformer").get("num_attention_heads", 1)
    if heads % config.tp_size:
        raise InvalidRequestError(f"--tp-size {config.tp_size} does not divide the model's {heads} attention heads",
                                  "tp_size")


class DenoiserGroup:
    def __init__(self, config: DenoiserConfig):
        check_degrees(config)
        self.config = config
        self.world = config.world_size
        from services.denoiser.ray_ranks import placement_group_ranks

        self.ranks = placement_group_ranks() or ProcessRanks()
        self._start()

    def _start(self) -> None:
        from services.denoiser.stage import DenoiserStage, warm_up

        address = f"{self.ranks.host}:{_free_port()}"
        self.ranks.start(self.world, address, self.config)
        config = rank_config(self.config, 0)  # rank 0: the first GPU this process sees
        _init(0, self.world, address, config.device)
        self.stage = DenoiserStage(config, mesh=ParallelMesh(_degrees(config), config.device.split(":")[0]))
        self.device = self.stage.device
        self.healthy = True
        warm_up(self, self.config)

    def _stop(self) -> None:
        self.ranks.stop()
        if dist.is_initialized():
            dist.destroy_process_group()

    def denoise(self, request: DenoiseRequest, on_step: Callable[[int, int], None] | None = None) -> DenoiseResponse:
        dead = self.ranks.dead()
        if dead or not self.healthy:
            self._stop()
            self._start()  # the next request gets a fresh replica
            raise StageUnavailableError(f"denoiser rank(s) {dead or '?'} died; the replica was restarted")
        try:
            dist.broadcast_object_list([request], src=0)
            return self.stage.denoise(request, on_step)
        except (RuntimeError, dist.DistBackendError) as exc:  # a collective failed: a rank is gone
            self.healthy = False
            raise StageUnavailableError(f"denoiser replica lost a rank mid-request: {str(exc).splitlines()[0]}") from exc

    def close(self) -> None:
        if dist.is_initialized():
            dist.broadcast_object_list([None], src=0)
        self._stop()
