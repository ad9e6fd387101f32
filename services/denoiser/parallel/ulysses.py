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
(SequenceParallel.for_graphs) the exchanges and the attention run as two ops: ulysses_post
starts the q/k/v exchange (through NCCL, or by copy engine from a side stream with
--ulysses-exchange copy-engine: copy_exchange.py) and returns, so that the model can run work
that does not need it; ulysses_finish waits for it, attends, and sends the output back from a
side stream under the attention of the rank's own queries. The general path below packs with
cat and serves uneven head counts."""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from services.denoiser.attention import local_attention
from services.denoiser.parallel import copy_exchange
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
    the exchanges run in the ops below (post_packed, then finish_packed). Otherwise traced, as
    ring attention's exchanges (USP) are."""
    if opaque is not None and not torch.is_grad_enabled():
        return finish_packed(post_packed(send, seq_sizes, rank, opaque), seq_sizes, rank, opaque, amax_qk)
    n, s, b, _, h, d = send.shape
    qkv = _trade_qkv(send, seq_sizes, group).view(sum(seq_sizes), b, 3, h, d).transpose(0, 1)
    out = inner(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, S_all, h, D]

    # Back: each rank's tokens, sequence-major ([S_all, B, h, D]: a view when B == 1 or when
    # the kernel wrote its output in that order), then heads gathered from every rank.
    send = out.transpose(0, 1).contiguous()
    unit = b * h * d
    recv = exchange(send.view(-1), [x * unit for x in seq_sizes], [s * unit] * n, group)
    return recv.view(n, s, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, s, n * h, d)


class Posted(NamedTuple):
    """A q/k/v exchange under way (post_packed): what was sent, kept alive until finish_packed,
    and where it arrives."""

    send: torch.Tensor
    recv: torch.Tensor


def post_packed(send: torch.Tensor, seq_sizes: list[int], rank: int, group_name: str) -> Posted:
    """Start the q/k/v exchange of `send` [n, s, B, 3, h, D]; the caller may run work that does not
    need it (Flux's single blocks: their MLP GEMM) before finish_packed."""
    return Posted(send, torch.ops.ditserve.ulysses_post(send, seq_sizes, rank, group_name))


def finish_packed(posted: Posted, seq_sizes: list[int], rank: int, group_name: str,
                  amax_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
                  after: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over what post_packed exchanged -> [B, s, n h, D]. `after`: a tensor the work
    meant to run beside the exchange produced, so that the compiler orders that work before
    this (an input the op only waits for)."""
    amax = amax_qk if amax_qk is not None else (None, None)
    return torch.ops.ditserve.ulysses_finish(posted.send, posted.recv, after, seq_sizes, rank, group_name, *amax)


def _trade_qkv(send: torch.Tensor, seq_sizes: list[int], group) -> torch.Tensor:
    """The q/k/v exchange through the process group: send [n, s, B, 3, h, D] -> every rank's
    tokens of our heads, flat in [S_all, B, 3, h, D] order."""
    n, s, b, _, h, d = send.shape
    unit = b * 3 * h * d  # elements per token
    return exchange(send.view(-1), [s * unit] * n, [x * unit for x in seq_sizes], group)


@torch.library.custom_op("ditserve::ulysses_post", mutates_args=())
def _ulysses_post(send: torch.Tensor, seq_sizes: list[int], rank: int, group_name: str) -> torch.Tensor:
    """The q/k/v exchange, started: returns [S_all, B, 3, h, D], to be read only by ulysses_finish.
    With the copy-engine exchange on (copy_exchange.py) by copy engine from a side stream, so
    that the GEMM the model issues before ulysses_finish runs beside it; otherwise (and on CPU)
    through the process group, now: NCCL's kernel would wait for that GEMM's SMs anyway. Opaque
    to torch.compile: inductor cannot place work on a second stream."""
    n, s, b, _, h, d = send.shape
    copier = copy_exchange.exchange_for(group_name, send.device) if send.is_cuda else None
    if copier is not None:
        return copier.post(send, seq_sizes)
    recv = _trade_qkv(send, seq_sizes, _resolve_process_group(group_name))
    return recv.view(sum(seq_sizes), b, 3, h, d)


@_ulysses_post.register_fake
def _(send, seq_sizes, rank, group_name):
    n, s, b, _, h, d = send.shape
    return send.new_empty((sum(seq_sizes), b, 3, h, d))


@torch.library.custom_op("ditserve::ulysses_finish", mutates_args=())
def _ulysses_finish(send: torch.Tensor, recv: torch.Tensor, after: torch.Tensor | None, seq_sizes: list[int],
                    rank: int, group_name: str, amax_q: torch.Tensor | None,
                    amax_k: torch.Tensor | None) -> torch.Tensor:
    """Attention over ulysses_post's exchange, with the output's way back hidden under the
    attention of this rank's own queries.

    The queries that other ranks own are attended first and sent back from a side stream while
    the attention of this rank's own queries (which never travel) runs: measured on 2x H200 at
    a Flux 1024x1024 single block (benchmarks/overlap.py), the output's all-to-all alone 49 us,
    half the attention 117 us, one after the other 178 us, side by side 120 us. `send` is here
    to live until the exchange that reads it is done; `after` only orders (_ulysses_post)."""
    group = _resolve_process_group(group_name)
    n, s, b, _, h, d = send.shape
    total, offs = sum(seq_sizes), offsets(seq_sizes)
    side = None
    if send.is_cuda:
        side = copy_exchange.side_stream(send.device)
        if copy_exchange.posts_by_copy(group_name):
            # q/k/v have landed. Only then: in a forward being captured, a wait on the side
            # stream before any work of the capture ran there is an error that voids the capture
            # (the NCCL path's graphs all failed to capture so, 2x H200).
            torch.cuda.current_stream(send.device).wait_stream(side)
    qkv = recv.transpose(0, 1)  # [B, S_all, 3, h, D]
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
    if side is not None:
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


@_ulysses_finish.register_fake
def _(send, recv, after, seq_sizes, rank, group_name, amax_q, amax_k):
    n, s, b, _, h, d = send.shape
    return send.new_empty((b, s, n * h, d))
