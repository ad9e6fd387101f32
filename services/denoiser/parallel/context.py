"""Sequence parallelism for one forward: shard the image tokens, run the model, gather them back.

While `SequenceParallel.active()` is entered, the attention dispatch routes every attention call
here: Ulysses within the ulysses group, ring attention across the ring group (both: USP). Image
tokens are laid out ring-major: ring chunk c holds sp shards c*U .. c*U+U-1, contiguous."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from services.denoiser.attention import active_parallel, local_attention
from services.denoiser.parallel.comm import all_to_all
from services.denoiser.parallel.mesh import ParallelMesh, even_split, offsets
from services.denoiser.parallel.ring import ring_attention
from services.denoiser.parallel.ulysses import ulysses_attention


class SequenceParallel:
    def __init__(self, mesh: ParallelMesh, image_tokens: int):
        self.mesh = mesh
        self.u, self.r = mesh.degrees.ulysses, mesh.degrees.ring
        self.sizes = even_split(image_tokens, mesh.sp_size)  # per sp rank
        self.offsets = offsets(self.sizes)
        ring_rank = mesh.rank("ring")
        # Image tokens of each ring chunk, and of each ulysses shard inside ours.
        self.chunk_sizes = [sum(self.sizes[c * self.u : (c + 1) * self.u]) for c in range(self.r)]
        self.ulysses_sizes = self.sizes[ring_rank * self.u : (ring_rank + 1) * self.u]

    @property
    def local_slice(self) -> slice:
        i = self.mesh.sp_rank
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N_img, C] -> this rank's [B, N_local, C]."""
        return tokens[:, self.local_slice]

    def shard_rope(self, rope: tuple[torch.Tensor, torch.Tensor], text_len: int):
        """Tables for [text; all image] -> tables for [text; this rank's image shard]."""
        s = self.local_slice
        return tuple(torch.cat([t[:text_len], t[text_len + s.start : text_len + s.stop]]) for t in rope)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's [B, N_local, C] -> the whole [B, N_img, C] on every rank."""
        b, _, c = local.shape
        if self.u > 1:
            shapes = [(b, n, c) for n in self.ulysses_sizes]
            local = torch.cat(all_to_all([local] * self.u, shapes, self.mesh.group("ulysses")), dim=1)
        if self.r > 1:
            shapes = [(b, n, c) for n in self.chunk_sizes]
            local = torch.cat(all_to_all([local] * self.r, shapes, self.mesh.group("ring")), dim=1)
        return local

    def attention(self, q, k, v, text_len: int) -> torch.Tensor:
        if self.r > 1:
            inner = partial(self._ring, group=self.mesh.group("ring"), rank=self.mesh.rank("ring"))
        else:
            inner = lambda q, k, v, text_len: local_attention(q, k, v)  # noqa: E731
        if self.u == 1:
            return inner(q, k, v, text_len)
        return ulysses_attention(
            q, k, v, text_len, self.ulysses_sizes, self.mesh.group("ulysses"), self.mesh.rank("ulysses"), inner
        )

    def _ring(self, q, k, v, text_len, group, rank):
        return ring_attention(q, k, v, text_len, self.chunk_sizes, group, rank)

    @contextmanager
    def active(self):
        token = active_parallel.set(self)
        try:
            yield self
        finally:
            active_parallel.reset(token)
