"""A denoiser replica over several CPU ranks (gloo) gives the single-rank pixels end to end, and a
rank that dies fails its request cleanly and the replica is rebuilt."""

import asyncio
import time

import numpy as np
import pytest

from services.cli import build_in_process_router
from services.runtime.config import GenerateRequest, StageConfig
from services.runtime.errors import StageUnavailableError

# 48x80 -> 6x10 latents -> 15 packed image tokens: divides by none of the degrees.
REQUEST = dict(prompt="a red circle", negative_prompt="dark", true_cfg_scale=3.0, height=48, width=80,
               num_inference_steps=3, seed=5)


def _generate(router, **overrides):
    return asyncio.run(router.generate(GenerateRequest(**{**REQUEST, **overrides}))).images[0].pixels.astype(int)


@pytest.fixture(scope="module")
def single_rank(flux_dev_dir):
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))
    return {"square": _generate(router, height=64, width=64), "wide": _generate(router)}


@pytest.mark.parametrize(
    "parallel",
    [
        dict(ulysses_degree=2),
        dict(cfg_parallel=True),
        dict(cfg_parallel=True, ulysses_degree=2),
        dict(ring_degree=2),
        dict(ring_degree=2, ulysses_degree=2),
        dict(tp_size=2),
        dict(tp_size=2, ulysses_degree=2),
    ],
    ids=["ulysses2", "cfg2", "cfg2xulysses2", "ring2", "ring2xulysses2", "tp2", "tp2xulysses2"],
)
def test_parallel_replica_gives_single_rank_pixels(flux_dev_dir, single_rank, parallel):
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"),
                                     denoiser_options=parallel)
    try:
        for name, size in (("square", dict(height=64, width=64)), ("wide", {})):
            got = _generate(router, **size)
            diff = np.abs(got - single_rank[name])
            # Shards change GEMM shapes, ring attention merges softmax blocks and TP sums partial
            # products across ranks: fp32 agrees to ~1e-7 (module tests), which may flip an
            # 8-bit rounding here and there, never more.
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    finally:
        router.denoiser.stage.close()


def test_dead_rank_fails_cleanly_and_the_replica_is_rebuilt(flux_dev_dir, single_rank):
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"),
                                     denoiser_options=dict(ulysses_degree=2))
    group = router.denoiser.stage
    try:
        assert np.abs(_generate(router) - single_rank["wide"]).max() <= 1
        # A follower dies mid-request: rank 0's next collective fails instead of hanging.
        t0 = time.monotonic()
        task_router_call = _long_request_with_kill(router, group)
        assert time.monotonic() - t0 < 60
        assert isinstance(task_router_call, StageUnavailableError), task_router_call
        # The next request finds the replica broken, rebuilds it and says so...
        with pytest.raises(StageUnavailableError, match="restarted"):
            _generate(router)
        # ...and the one after is served by the new ranks.
        assert np.abs(_generate(router) - single_rank["wide"]).max() <= 1
    finally:
        group.close()


def _long_request_with_kill(router, group):
    async def main():
        task = asyncio.ensure_future(router.generate(GenerateRequest(
            prompt="x", height=256, width=256, num_inference_steps=1000, seed=1)))
        await asyncio.sleep(2.0)
        group.ranks.kill_rank(1)
        try:
            await task
        except Exception as exc:  # the error the router saw
            return exc
        return None

    return asyncio.run(main())


def test_a_rank_lets_its_stage_release_the_group_before_leaving_it():
    """leave_group asks the stage to let go first (on GPU: the CUDA graphs whose captured NCCL
    work NCCL's abort would wait for), while the group still exists, then leaves it."""
    import socket

    import torch.distributed as dist

    from services.runtime.rank_group import _init, leave_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _init(0, 1, f"127.0.0.1:{port}", "cpu")
    seen = []

    class Stage:
        def before_leaving_group(self):
            seen.append(dist.is_initialized())

    leave_group(Stage())
    assert seen == [True] and not dist.is_initialized()


class _SumStage:
    """A stage whose call is one collective: the sum of every rank's copy of the request."""

    def __init__(self, device: str):
        self.device = device

    def total(self, value):
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t)
        return t.item()


def sum_stage(config):
    return _SumStage(config.device)


def test_an_idle_replica_outlives_its_collective_timeout(device="cpu"):
    """Followers wait for the next request on the control group, which has no timeout: a replica
    idle for longer than its collectives may take still serves (before, its followers timed out
    waiting and the next request failed with 'rank died'). tests/gpu runs it on NCCL."""
    from services.runtime.rank_group import RankGroup, RankSpec

    group = RankGroup(RankSpec("test", sum_stage, "total", StageConfig(device=device), collective_timeout_s=2), 2)
    try:
        assert group.call(1) == 2.0
        time.sleep(4)  # twice the collective timeout
        assert group.ranks.dead() == []
        assert group.call(3) == 6.0
    finally:
        group.close()


def test_the_death_watch_aborts_and_releases_at_once_and_gives_up_after_its_deadline(monkeypatch):
    """rank_group._DeathWatch, with stand-ins for what it drives (real NCCL needs GPUs; tests/gpu
    kills a rank for real). A rank's death starts NCCL's abort and the stage's release together:
    here, as on a GPU with CUDA graphs, each waits for the other (the abort for the graphs to go,
    the graphs' destruction for the device the abort frees), so running them one after the other
    deadlocks. If they do not finish within RECOVERY_S the process ends instead of hanging."""
    import logging
    import threading

    from services.runtime import rank_group

    class Ranks:
        dead_now: list[int] = []

        def dead(self):
            return self.dead_now

    abort_started, released = threading.Event(), threading.Event()

    def abort():
        abort_started.set()
        assert released.wait(5)

    class Stage:
        def on_rank_death(self):
            assert abort_started.wait(5)
            released.set()

    monkeypatch.setattr(rank_group, "_abort_communicators", abort)
    monkeypatch.setattr(rank_group, "DEATH_POLL_S", 0.01)
    exits = []
    monkeypatch.setattr(rank_group.os, "_exit", exits.append)
    monkeypatch.setattr(logging, "shutdown", lambda: None)

    ranks = Ranks()
    with rank_group._DeathWatch(ranks, Stage()) as quiet:  # nobody dies: nothing happens
        time.sleep(0.05)
    assert not quiet.fired and not abort_started.is_set()

    with rank_group._DeathWatch(ranks, Stage()) as watch:
        ranks.dead_now = [1]
        watch._thread.join(10)
    assert watch.fired and abort_started.is_set() and released.is_set() and exits == []

    # An abort that never returns: after RECOVERY_S the process is ended (here: recorded).
    monkeypatch.setattr(rank_group, "RECOVERY_S", 0.2)
    monkeypatch.setattr(rank_group, "_abort_communicators", lambda: threading.Event().wait(30))
    with rank_group._DeathWatch(ranks, Stage()) as stuck:
        stuck._thread.join(10)
    assert stuck.fired and exits == [70]
