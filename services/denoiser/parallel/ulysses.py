"""Ulysses sequence parallelism: all-to-all around attention.

Each rank holds a shard of the joint [text; image] sequence (shard sizes may differ by one).
Before attention an all-to-all trades sequence for heads, so every rank sees the whole sequence
for its share of the heads (which may also differ by one); after attention, the reverse.
Attention does not care about the order of the gathered tokens, so each rank's shard travels as
one piece, text and image together."""

from __future__ import annotations

from typing import Callable

import torch

from services.denoiser.parallel.comm import all_to_all
from services.denoiser.parallel.mesh import even_split, offsets


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_sizes: list[int],
    group,
    rank: int,
    inner: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """q/k/v [B, seq_sizes[rank], H, D] -> same shape; `inner` attends over
    [B, sum(seq_sizes), H_rank, D] (plain attention, or ring attention for USP)."""
    n = len(seq_sizes)
    b, _, heads, d = q.shape
    head_sizes = even_split(heads, n)
    head_offs = offsets(head_sizes)

    # One collective for q, k and v: scatter heads, gather sequence.
    qkv = torch.stack([q, k, v])
    chunks = [qkv[:, :, :, head_offs[j] : head_offs[j] + head_sizes[j]] for j in range(n)]
    shapes = [(3, b, seq_sizes[i], head_sizes[rank], d) for i in range(n)]
    q_all, k_all, v_all = torch.cat(all_to_all(chunks, shapes, group), dim=2)

    out = inner(q_all, k_all, v_all)

    # Back: scatter sequence, gather heads.
    seq_offs = offsets(seq_sizes)
    chunks = [out[:, seq_offs[j] : seq_offs[j] + seq_sizes[j]] for j in range(n)]
    shapes = [(b, seq_sizes[rank], head_sizes[i], d) for i in range(n)]
    return torch.cat(all_to_all(chunks, shapes, group), dim=2)
