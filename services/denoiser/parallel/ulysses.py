"""Ulysses sequence parallelism: all-to-all around attention.

Each rank holds a shard of the image tokens (sizes may differ by one) and the whole text. Before
attention an all-to-all trades sequence for heads (every rank gets every image token for its
share of the heads, which may also differ by one); after, the reverse. Text tokens are
replicated, so a rank just takes its heads of them, and the text output is re-assembled from
every rank's heads."""

from __future__ import annotations

from typing import Callable

import torch

from services.denoiser.parallel.comm import all_to_all
from services.denoiser.parallel.mesh import even_split, offsets


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_len: int,
    seq_sizes: list[int],
    group,
    rank: int,
    inner: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """q/k/v [B, text_len + seq_sizes[rank], H, D] -> same shape; `inner` attends over
    [B, text_len + sum(seq_sizes), H_rank, D] (plain attention, or ring attention for USP)."""
    n = len(seq_sizes)
    b, _, heads, d = q.shape
    head_sizes, head_offs = even_split(heads, n), offsets(even_split(heads, n))
    my_heads = slice(head_offs[rank], head_offs[rank] + head_sizes[rank])

    # One collective for q, k and v: scatter heads, gather sequence.
    qkv = torch.stack([q[:, text_len:], k[:, text_len:], v[:, text_len:]])
    chunks = [qkv[:, :, :, head_offs[j] : head_offs[j] + head_sizes[j]] for j in range(n)]
    shapes = [(3, b, seq_sizes[i], head_sizes[rank], d) for i in range(n)]
    img_q, img_k, img_v = torch.cat(all_to_all(chunks, shapes, group), dim=2)

    out = inner(
        torch.cat([q[:, :text_len, my_heads], img_q], dim=1),
        torch.cat([k[:, :text_len, my_heads], img_k], dim=1),
        torch.cat([v[:, :text_len, my_heads], img_v], dim=1),
        text_len,
    )
    txt_out, img_out = out[:, :text_len], out[:, text_len:]

    # Image back: scatter sequence, gather heads. Text: every rank's heads to every rank.
    seq_offs = offsets(seq_sizes)
    chunks = [img_out[:, seq_offs[j] : seq_offs[j] + seq_sizes[j]] for j in range(n)]
    shapes = [(b, seq_sizes[rank], head_sizes[i], d) for i in range(n)]
    img_out = torch.cat(all_to_all(chunks, shapes, group), dim=2)
    shapes = [(b, text_len, head_sizes[i], d) for i in range(n)]
    txt_out = torch.cat(all_to_all([txt_out] * n, shapes, group), dim=2)
    return torch.cat([txt_out, img_out], dim=1)
