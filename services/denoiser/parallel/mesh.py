"""The process groups of one denoiser replica: ranks laid out as (cfg, ring, ulysses, tp), tp fastest."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDegrees:
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg parallel degree must be 1 or 2, got {self.cfg}")
        for name in ("ring", "ulysses", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} degree must be >= 1")

    @property
    def world_size(self) -> int:
        return self.cfg * self.ring * self.ulysses * self.tp


class ParallelMesh:
    """Built on every rank of an initialised default process group of size degrees.world_size."""

    def __init__(self, degrees: ParallelDegrees, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        if dist.get_world_size() != degrees.world_size:
            raise ValueError(f"world size {dist.get_world_size()} != cfg x ring x ulysses x tp = {degrees.world_size}")
        self.degrees = degrees
        self.mesh = init_device_mesh(
            device_type,
            (degrees.cfg, degrees.ring, degrees.ulysses, degrees.tp),
            mesh_dim_names=("cfg", "ring", "ulysses", "tp"),
        )

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh.get_group(dim)

    def rank(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    @property
    def sp_size(self) -> int:
        return self.degrees.ring * self.degrees.ulysses

    @property
    def sp_rank(self) -> int:
        """Position of this rank's sequence shard: ring-major, then ulysses."""
        return self.rank("ring") * self.degrees.ulysses + self.rank("ulysses")


def even_split(n: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous pieces of n items, the first n % parts one larger."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


