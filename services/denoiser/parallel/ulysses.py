"""Ulysses sequence parallelism: all-to-all around attention.

Each rank holds a shard of the joint [text; image] sequence (shard sizes may differ by one).
Before attention an all-to-all trades sequence for heads, so every rank sees the whole sequence
for its share of the heads (which may also differ by one); after attention, the reverse.
Attention does not care about the order of the gathered tokens, so each rank's shard travels as
one piece, text and image together.

When the heads divide evenly (the usual case) the data is laid out so that the exchanges need
almost no packing: q/k/v are written once, rank-major as [rank, S, B, 3, h, D] (under
torch.compile that write fuses into the QK-norm / RoPE kernel that produces them; in a forward
replayed from a CUDA graph Flux writes it with qk_norm.ulysses_pack's kernel), and what
arrives, [S_all, B, 3, h, D], is attended to in place through strided views; the attention
output goes back without a copy where its memory is already sequence-major. In graphed forwards
(SequenceParallel.for_graphs) the exchanges and the attention run as one op, ulysses_attend,
which sends the output back from a side stream under the attention of the rank's own queries.
The general path below packs with cat and serves uneven head counts."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from services.denoiser.attention import local_attention
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
    opaque: str | None = None,
) -> torch.Tensor:
    """q/k/v [B, seq_sizes[rank], H, D] -> same shape; `inner` attends over
    [B, sum(seq_sizes), H_rank, D] (plain attention, or ring attention for USP). `opaque`: the
    group's name where `inner` is plain local attention (see attend_packed)."""
    n = len(seq_sizes)
    b, _, heads, d = q.shape
    if heads % n == 0:
        s, h = q.shape[1], heads // n
        send = torch.stack([q, k, v], dim=2).view(b, s, 3, n, h, d).permute(3, 1, 0, 2, 4, 5).contiguous()
        return attend_packed(send, seq_sizes, group, rank, inner, opaque)
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


def attend_packed(send: torch.Tensor, seq_sizes: list[int], group, rank: int, inner, opaque: str | None,
                  amax_qk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """send [n, s, B, 3, h, D] (rank j's heads of this rank's q, k, v: qk_norm.ulysses_pack's or
    ulysses_attention's layout) -> the attention output [B, s, n h, D]. `opaque`, the group's
    name where `inner` is plain local attention (which `amax_qk` is then for): without autograd
    the exchanges run in ulysses_attend's op, which hides the output's way back under attention.
    Otherwise traced, as ring attention's exchanges (USP) are."""
    if opaque is not None and not torch.is_grad_enabled():
        amax = amax_qk if amax_qk is not None else (None, None)
        return torch.ops.ditserve.ulysses_attend(send, seq_sizes, rank, opaque, *amax)
    n, s, b, _, h, d = send.shape
    qkv = _trade_qkv(send, seq_sizes, group)
    out = inner(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, S_all, h, D]

    # Back: each rank's tokens, sequence-major ([S_all, B, h, D]: a view when B == 1 or when
    # the kernel wrote its output in that order), then heads gathered from every rank.
    send = out.transpose(0, 1).contiguous()
    unit = b * h * d
    recv = exchange(send.view(-1), [x * unit for x in seq_sizes], [s * unit] * n, group)
    return recv.view(n, s, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, s, n * h, d)


def _trade_qkv(send: torch.Tensor, seq_sizes: list[int], group) -> torch.Tensor:
    """The q/k/v exchange: send [n, s, B, 3, h, D] -> every rank's tokens of our heads,
    [B, S_all, 3, h, D] (a strided view of what arrived)."""
    n, s, b, _, h, d = send.shape
    unit = b * 3 * h * d  # elements per token
    recv = exchange(send.view(-1), [s * unit] * n, [x * unit for x in seq_sizes], group)
    return recv.view(sum(seq_sizes), b, 3, h, d).transpose(0, 1)


# A side stream per device for the output's exchange (made on first use, which is a warm-up
# call outside any CUDA-graph capture).
_side_streams: dict[int, torch.cuda.Stream] = {}


@torch.library.custom_op("ditserve::ulysses_attend", mutates_args=())
def _ulysses_attend(send: torch.Tensor, seq_sizes: list[int], rank: int, group_name: str,
                    amax_q: torch.Tensor | None, amax_k: torch.Tensor | None) -> torch.Tensor:
    """attend_packed with the output's exchange under the attention of this rank's own queries.

    The queries that other ranks own are attended first and sent back from a side stream while
    the attention of this rank's own queries (which never travel) runs: measured on 2x H200 at
    a Flux 1024x1024 single block (benchmarks/overlap.py), the output's all-to-all alone 49 us,
    half the attention 117 us, one after the other 178 us, side by side 120 us. (Beside a
    cuBLAS GEMM the same exchange hardly overlaps, at any SM carve-out: 353 -> 331-338 us.)
    Opaque to torch.compile: inductor cannot place work on a second stream."""
    group = _resolve_process_group(group_name)
    n, s, b, _, h, d = send.shape
    total, offs = sum(seq_sizes), offsets(seq_sizes)
    qkv = _trade_qkv(send, seq_sizes, group)
    amax = (amax_q, amax_k) if amax_q is not None else None

    def attend(lo: int, hi: int) -> torch.Tensor:  # queries lo:hi over every key -> [hi - lo, B, h, D]
        return local_attention(qkv[:, lo:hi, 0], qkv[:, :, 1], qkv[:, :, 2], amax).transpose(0, 1)

    mine = (offs[rank], offs[rank] + s)
    others = [r for r in ((0, mine[0]), (mine[1], total)) if r[1] > r[0]]  # other ranks' queries, in rank order
    theirs = [attend(*r) for r in others]
    back = theirs[0].contiguous() if len(theirs) == 1 else torch.cat(theirs)  # [total - s, B, h, D]
    unit = b * h * d
    in_splits = [0 if j == rank else x * unit for j, x in enumerate(seq_sizes)]
    out_splits = [0 if j == rank else s * unit for j in range(n)]
    returned = back.new_empty((n - 1, s, b, h, d))  # each other rank's heads of our tokens
    side = None
    if send.is_cuda:
        if send.device.index not in _side_streams:
            _side_streams[send.device.index] = torch.cuda.Stream(send.device)
        side = _side_streams[send.device.index]
        side.wait_stream(torch.cuda.current_stream(send.device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        dist.all_to_all_single(returned.view(-1), back.view(-1), out_splits, in_splits, group=group)
    own = attend(*mine)  # [s, B, h, D], beside the exchange
    out = send.new_empty((b, s, n, h, d))
    out[:, :, rank] = own.transpose(0, 1)
    if side is not None:
        torch.cuda.current_stream(send.device).wait_stream(side)
    heads = [j for j in range(n) if j != rank]
    if heads == list(range(heads[0], heads[-1] + 1)):  # one slice (always for n == 2)
        out[:, :, heads[0] : heads[-1] + 1] = returned.permute(2, 1, 0, 3, 4)
    else:
        for i, j in enumerate(heads):
            out[:, :, j] = returned[i].transpose(0, 1)
    return out.view(b, s, n * h, d)


@_ulysses_attend.register_fake
def _(send, seq_sizes, rank, group_name, amax_q, amax_k):
    n, s, b, _, h, d = send.shape
    return send.new_empty((b, s, n * h, d))
