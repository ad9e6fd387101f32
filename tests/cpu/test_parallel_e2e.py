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


def test_the_death_watch_aborts_and_releases_at_once_and_gives_up_after_its_deadline(monkeypatch, caplog):
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

    # An abort that never returns: after RECOVERY_S the process is ended (here: recorded), and
    # meanwhile the log says every PROGRESS_S which step is still running.
    monkeypatch.setattr(rank_group, "RECOVERY_S", 0.5)
    monkeypatch.setattr(rank_group, "PROGRESS_S", 0.1)
    monkeypatch.setattr(rank_group, "_abort_communicators", lambda: threading.Event().wait(30))
    with caplog.at_level(logging.WARNING, logger="services.runtime.rank_group"):
        with rank_group._DeathWatch(ranks, Stage()) as stuck:
            stuck._thread.join(10)
    assert stuck.fired and exits == [70]
    said = [r.getMessage() for r in caplog.records if "still running: nccl-abort" in r.getMessage()]
    assert len(said) >= 3, said  # every PROGRESS_S, not once at the end


def test_every_communicator_is_aborted_at_once(monkeypatch):
    """NCCL's abort of one communicator waits for the CUDA graphs that captured its work, and a
    graph's replay may be stuck on another communicator's kernel, which only that one's abort
    ends: here group A's abort returns only once B's has begun, so aborting one group after the
    other would never reach B."""
    import threading
    from types import SimpleNamespace

    from services.runtime import rank_group

    b_started, finished = threading.Event(), []

    class Group:
        def __init__(self, name, waits_for=None, starts=None):
            self.name, self.waits_for, self.starts = name, waits_for, starts

        def abort(self):
            if self.starts is not None:
                self.starts.set()
            if self.waits_for is not None:
                assert self.waits_for.wait(5), f"{self.name}'s abort waited for the other's in vain"
            finished.append(self.name)

    groups = {Group("A", waits_for=b_started): "A", Group("B", starts=b_started): "B"}
    monkeypatch.setattr(rank_group.dist.distributed_c10d, "_world", SimpleNamespace(pg_names=groups))
    rank_group._abort_communicators()
    assert sorted(finished) == ["A", "B"]


def test_a_replica_built_again_after_copy_engine_exchanges_uses_nccl(flux_dev_dir, monkeypatch, caplog):
    """A replica built in a process that has set up copy-engine exchanges before (rank 0's, e.g.
    before a rank died; the followers are fresh processes) runs its Ulysses exchanges through
    NCCL: torch's symmetric memory counts its store exchanges per process, so fresh followers'
    keys would never meet rank 0's (copy_exchange.set_up_here). The choice travels in the config
    every rank gets, so that all agree. (Setting an exchange up needs CUDA: the flag it leaves is
    set by hand here.)"""
    import logging

    from services.denoiser import group as group_module
    from services.denoiser import stage as stage_module
    from services.denoiser.parallel import copy_exchange
    from services.runtime.config import DenoiserConfig
    from services.runtime.rank_group import RankGroup

    started = []
    monkeypatch.setattr(RankGroup, "_start", lambda self: started.append(self.spec.config.ulysses_exchange))
    monkeypatch.setattr(stage_module, "warm_up", lambda group, config: None)
    config = DenoiserConfig(model_path=flux_dev_dir, device="cpu", ulysses_degree=2, ulysses_exchange="copy-engine")

    monkeypatch.setattr(copy_exchange, "_set_up_here", False)
    group = group_module.DenoiserGroup(config)  # nothing set up in this process yet: as configured
    assert started == ["copy-engine"]
    monkeypatch.setattr(copy_exchange, "_set_up_here", True)  # what its exchanges leave (CUDA)
    with caplog.at_level(logging.WARNING, logger="services.denoiser.group"):
        group._start()  # RankGroup.call's rebuild after a rank died
    assert started == ["copy-engine", "nccl"] and group.config.ulysses_exchange == "nccl"
    assert "through NCCL" in caplog.text
    group_module.DenoiserGroup(config)  # another replica in this process, from the same config
    assert started[-1] == "nccl"
