"""Ulysses sequence parallelism: all-to-all around attention.

Each rank holds a shard of the joint [text; image] sequence (shard sizes may differ by one).
Before attention an all-to-all trades sequence for heads, so every rank sees the whole sequence
for its share of the heads (which may also differ by one); after attention, the reverse.
Attention does not care about the order of the gathered tokens, so each rank's shard travels as
one piece, text and image together.

When the heads divide evenly (the usual case) the data is laid out so that the exchanges need
almost no packing: q/k/v are written once, rank-major as [rank, S, B, 3, h, D] (under
torch.compile that write fuses into the QK-norm / RoPE kernel that produces them), and what
arrives, [S_all, B, 3, h, D], is attended to in place through strided views; the attention
output goes back without a copy where its memory is already sequence-major. The general path
below packs with cat and serves uneven head counts."""

from __future__ import annotations

from typing import Callable

import torch

from services.denoiser.parallel.comm import all_to_all, exchange
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
    if heads % n == 0:
        return _even_heads(q, k, v, seq_sizes, group, inner)
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


def _even_heads(q, k, v, seq_sizes, group, inner):
    n, total = len(seq_sizes), sum(seq_sizes)
    b, s, heads, d = q.shape
    h = heads // n
    send = torch.stack([q, k, v], dim=2).view(b, s, 3, n, h, d).permute(3, 1, 0, 2, 4, 5).contiguous()
    unit = b * 3 * h * d  # elements per token
    recv = exchange(send.view(-1), [s * unit] * n, [x * unit for x in seq_sizes], group)
    qkv = recv.view(total, b, 3, h, d).transpose(0, 1)  # [B, S_all, 3, h, D], strided
    out = inner(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, S_all, h, D]

    # Back: each rank's tokens, sequence-major ([S_all, B, h, D]: a view when B == 1 or when
    # the kernel wrote its output in that order), then heads gathered from every rank.
    send = out.transpose(0, 1).contiguous()
    unit = b * h * d
    recv = exchange(send.view(-1), [x * unit for x in seq_sizes], [s * unit] * n, group)
    return recv.view(n, s, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, s, heads, d)
