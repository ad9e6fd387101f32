"""Ranks 1..N-1 of a multi-rank replica (rank_group.py) as Ray actors in the replica's placement group.

Ray Serve gives a multi-rank replica (a parallel denoiser, a tensor-parallel encoder) a placement
group (deployment option `placement_group_bundles`, one bundle per rank, STRICT_PACK: one node).
The replica itself runs in bundle 0 as rank 0; this starts one actor per other bundle, each
running the same follower loop as a spawned process would. Ray then accounts every rank's GPU,
and a rank's death is an actor death the group sees before its next request."""

from __future__ import annotations


def placement_group_ranks(role: str):
    """A RayActorRanks when we run inside a Ray actor that owns a placement group, else None."""
    try:
        import ray
        from ray.util import get_current_placement_group
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    pg = get_current_placement_group()
    return RayActorRanks(pg, role) if pg is not None else None


def _run(self, rank, world, address, spec):
    from services.runtime.rank_group import follower_main

    follower_main(rank, world, address, spec)


class RayActorRanks:
    def __init__(self, placement_group, role: str):
        import ray

        self.pg = placement_group
        self.host = ray.util.get_node_ip_address()
        # "DenoiserRank", "EncoderRank": what `ray list actors` and the process titles show.
        self.actor_name = f"{role.capitalize()}Rank"

    def start(self, world: int, address: str, spec) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = self.pg.bundle_specs
        if len(bundles) < world:
            raise ValueError(f"placement group has {len(bundles)} bundles for a {world}-rank replica")
        actor_cls = ray.remote(type(self.actor_name, (), {"run": _run, "__qualname__": self.actor_name}))
        self.actors, self.runs = [], []
        for r in range(1, world):
            actor = actor_cls.options(
                num_cpus=bundles[r].get("CPU", 0),
                num_gpus=bundles[r].get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                                     placement_group_bundle_index=r),
            ).remote()
            # Each rank actor sees only its own GPU: cuda:0 in its process.
            self.runs.append(actor.run.remote(r, world, address, spec.on_gpu(0)))
            self.actors.append(actor)

    def dead(self) -> list[int]:
        import ray

        finished, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        return [self.runs.index(f) + 1 for f in finished]

    def stop(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def kill_rank(self, rank: int) -> None:
        import ray

        ray.kill(self.actors[rank - 1])
