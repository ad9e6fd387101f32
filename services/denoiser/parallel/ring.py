"""Ring attention: each rank keeps its queries; K/V blocks travel around the ring and the partial
results are merged with their log-sum-exp (online softmax), so no rank ever holds the whole
sequence's K/V. The exchange of the next block overlaps the attention on the current one."""

from __future__ import annotations

import torch

from services.denoiser.attention import attention_with_lse
from services.denoiser.parallel.comm import RingExchange


def _merge(out, lse, block_out, block_lse):
    """Combine two softmax-normalised partial attentions over disjoint key sets."""
    new_lse = torch.logaddexp(lse, block_lse)
    w_old = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    w_new = torch.exp(block_lse - new_lse).transpose(1, 2).unsqueeze(-1)
    return out * w_old + block_out.float() * w_new, new_lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_sizes: list[int], group, rank: int):
    """q/k/v [B, chunk_sizes[rank], H, D]: attend to every rank's K/V chunk."""
    ring = RingExchange(group)
    n = len(chunk_sizes)
    b, _, h, d = k.shape
    pending = ring.start((k, v), [(b, chunk_sizes[(rank - 1) % n], h, d)] * 2) if n > 1 else None
    out, lse = attention_with_lse(q, k, v)
    out = out.float()
    for step in range(1, n):
        recv, handles = pending
        ring.wait(handles)
        block = tuple(recv)
        if step < n - 1:
            pending = ring.start(block, [(b, chunk_sizes[(rank - step - 1) % n], h, d)] * 2)
        block_out, block_lse = attention_with_lse(q, *block)
        out, lse = _merge(out, lse, block_out, block_lse)
    return out.to(q.dtype)
