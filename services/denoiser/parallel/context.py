"""Sequence parallelism for one forward: shard the tokens, run the model, gather the image back.

Both the text and the image tokens are split over the ring x ulysses ranks (shards may differ by
one token), so no rank repeats another's work on the prompt. While `active()` is entered the
attention dispatch routes every attention call here: Ulysses within the ulysses group, ring
attention across the ring group (both: USP). Shards are laid out ring-major: ring chunk c holds
sp shards c*U .. c*U+U-1."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import partial

import torch

from services.denoiser.attention import local_attention, set_active_parallel
from services.denoiser.parallel import copy_exchange
from services.denoiser.parallel.comm import all_to_all
from services.denoiser.parallel.mesh import ParallelMesh, even_split, offsets
from services.denoiser.parallel.ring import ring_attention
from services.denoiser.parallel.ulysses import Posted, finish_packed, post_packed, ulysses_attention


class _Split:
    """How n tokens divide over the sp ranks."""

    def __init__(self, n: int, parts: int):
        self.sizes = even_split(n, parts)
        self.offsets = offsets(self.sizes)

    def piece(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])


class SequenceParallel:
    def __init__(self, mesh: ParallelMesh, text_tokens: int, image_tokens: int, outside_graphs: bool = False):
        """`outside_graphs`: attention's exchanges run outside compiled graphs (attention.py), for
        a model whose text length varies per prompt (spec.variable_text). Traced, they would make
        every token split a graph of its own: each new prompt length recompiled every block (up
        to compile.MAX_SHAPES, then eager). Outside, the blocks compile around them once per
        text-length dynamism (compile.py) and inductor cannot move compute under the exchange."""
        self.mesh = mesh
        self.outside_graphs = outside_graphs
        self.u, self.r = mesh.degrees.ulysses, mesh.degrees.ring
        self.text = _Split(text_tokens, mesh.sp_size)
        self.image = _Split(image_tokens, mesh.sp_size)
        seq = [t + i for t, i in zip(self.text.sizes, self.image.sizes)]  # per sp rank
        ring_rank = mesh.rank("ring")
        self.ring_chunks = [sum(seq[c * self.u : (c + 1) * self.u]) for c in range(self.r)]
        self.ulysses_seq = seq[ring_rank * self.u : (ring_rank + 1) * self.u]
        # The Ulysses group's name where its exchanges run as ops (for_graphs); read when the view
        # is made, not in traced code, which cannot read a process group's attributes.
        self._op_group = None

    def shard(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, C], [B, N, C] -> this rank's shards of each."""
        i = self.mesh.sp_rank
        return text[:, self.text.piece(i)], image[:, self.image.piece(i)]

    def shard_rope(self, rope: tuple[torch.Tensor, torch.Tensor]):
        """Tables for [all text; all image] -> tables for [text shard; image shard]."""
        i, t = self.mesh.sp_rank, sum(self.text.sizes)
        ts, im = self.text.piece(i), self.image.piece(i)
        return tuple(torch.cat([tab[ts], tab[t + im.start : t + im.stop]]) for tab in rope)

    def gather_image(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's [B, N_local, C] image tokens -> the whole [B, N, C] on every rank."""
        b, _, c = local.shape
        ring_rank = self.mesh.rank("ring")
        if self.u > 1:
            sizes = self.image.sizes[ring_rank * self.u : (ring_rank + 1) * self.u]
            parts = all_to_all([local] * self.u, [(b, n, c) for n in sizes], self.mesh.group("ulysses"))
            local = torch.cat(parts, dim=1)
        if self.r > 1:
            sizes = [sum(self.image.sizes[k * self.u : (k + 1) * self.u]) for k in range(self.r)]
            local = torch.cat(all_to_all([local] * self.r, [(b, n, c) for n in sizes], self.mesh.group("ring")), dim=1)
        return local

    def _inner(self, amax_qk):
        if self.r > 1:  # bf16 / fp32 only: the bounds are for fp8 attention
            return partial(ring_attention, chunk_sizes=self.ring_chunks, group=self.mesh.group("ring"),
                           rank=self.mesh.rank("ring"))
        return partial(local_attention, amax_qk=amax_qk)  # the bounds hold for any shard of the heads

    def attention(self, q, k, v, amax_qk=None) -> torch.Tensor:
        if self.u == 1:
            return self._inner(amax_qk)(q, k, v)
        return ulysses_attention(q, k, v, self.ulysses_seq, self.mesh.group("ulysses"), self.mesh.rank("ulysses"),
                                 self._inner(amax_qk), self._op_group)

    def packs(self, heads: int) -> int:
        """n > 1 where post_packed takes q / k / v of `heads` heads as a send buffer laid out for
        n Ulysses ranks (qk_norm.ulysses_pack), else 0. Only in forwards replayed from CUDA graphs
        (for_graphs). Without graphs it measured 77.6 -> 74.6 ms in bf16 (Flux 1024x1024 Ulysses-2,
        2x H200, one run), but that step is close to host-bound, and the host-bound fp8 one reads
        64-109 ms across runs of the same code, too noisy to show what three more Python kernel
        launches a block cost it; so plain forwards keep the code they had."""
        return self.u if self._op_group is not None and heads % self.u == 0 else 0

    def post_packed(self, send: torch.Tensor) -> Posted:
        """Start the exchange of q / k / v given as their send buffer [u, S, B, 3, H / u, D] (see
        packs); attention_packed finishes it."""
        return post_packed(send, self.ulysses_seq, self.mesh.rank("ulysses"), self._op_group)

    def attention_packed(self, posted: Posted, amax_qk=None, after: torch.Tensor | None = None) -> torch.Tensor:
        """attention() of what post_packed sent; returns [B, S, H, D]. `after`: see finish_packed."""
        return finish_packed(posted, self.ulysses_seq, self.mesh.rank("ulysses"), self._op_group, amax_qk, after)

    def for_graphs(self) -> SequenceParallel:
        """This layout for forwards replayed from CUDA graphs: there the Ulysses exchanges run as
        ops (ulysses.py's ulysses_post / ulysses_finish) that hide the q/k/v exchange under the
        work the model puts between them and the output's way back under attention, fed by
        qk_norm.ulysses_pack (see packs). The op costs more host time than the traced
        exchanges, and a forward that is not replayed is bound by its host (2x H200, Flux
        1024x1024 Ulysses-2: 78.4 -> 133.6 ms a step without graphs; 76.9 -> 71.8 with them).
        Made once and kept, as the part views are: compiled blocks guard on the active object's
        identity, so a replica compiles its blocks once more for the graphed forwards."""
        if self._op_group is not None or self.u == 1 or self.r > 1:
            return self
        if "_graphed" not in self.__dict__:
            view = copy.copy(self)
            view.__dict__.pop("_part_views", None)  # its own, which inherit the op
            view._op_group = self.mesh.group("ulysses").group_name
            self._graphed = view
        return self._graphed

    @contextmanager
    def active(self):
        if self._op_group is not None:
            copy_exchange.begin_forward(self._op_group)
        previous = set_active_parallel(self)
        try:
            yield self
        finally:
            set_active_parallel(previous)

    # --- attention over one part of the sequence (Z-Image's per-modality refiner layers) ---
    @staticmethod
    @contextmanager
    def attend_within(part: str):
        """While entered, attention() attends over only the "text" or only the "image" tokens:
        for layers that see one part alone (Z-Image's context / noise refiners), called on this
        rank's shard of that part. Ulysses and ring then exchange that part's shard sizes in
        place of the joint [text; image] ones. Outside a parallel forward it does nothing (a
        single rank attends over whatever sequence it is given)."""
        active = set_active_parallel(None)  # returns the active SequenceParallel, if any
        try:
            set_active_parallel(active._part_view(part) if active is not None else None)
            yield
        finally:
            set_active_parallel(active)

    def _part_view(self, part: str) -> SequenceParallel:
        # One view per part, made once and kept: torch.compile guards on the active object's
        # identity, so a new view every forward would recompile the compiled blocks.
        views = self.__dict__.setdefault("_part_views", {})
        if part not in views:
            sizes = {"text": self.text, "image": self.image}[part].sizes  # per sp rank
            view = copy.copy(self)  # same mesh and groups
            ring_rank = self.mesh.rank("ring")
            view.ring_chunks = [sum(sizes[c * self.u : (c + 1) * self.u]) for c in range(self.r)]
            view.ulysses_seq = sizes[ring_rank * self.u : (ring_rank + 1) * self.u]
            views[part] = view
        return views[part]
