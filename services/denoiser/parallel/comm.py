"""The collectives of the parallel layers. Uneven pieces are the normal case (token and head
counts rarely divide the degree), so everything goes through all_to_all_single with explicit
split sizes (alltoallv), which both NCCL and gloo implement."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def all_to_all(chunks: list[torch.Tensor], out_shapes: list[tuple[int, ...]], group) -> list[torch.Tensor]:
    """Send chunks[j] to rank j of `group`; return what rank i sent us, shaped out_shapes[i]."""
    send = torch.cat([c.contiguous().reshape(-1) for c in chunks])
    out_splits = [math.prod(s) for s in out_shapes]
    recv = exchange(send, [c.numel() for c in chunks], out_splits, group)
    return [r.view(s) for r, s in zip(recv.split(out_splits), out_shapes)]


def exchange(send: torch.Tensor, in_splits: list[int], out_splits: list[int], group) -> torch.Tensor:
    """alltoallv of one flat buffer: its consecutive pieces of in_splits elements go to ranks
    0, 1, ...; returns the flat concatenation of what each rank sent us. For callers that lay
    their data out rank-major already, so nothing is copied to pack or unpack."""
    recv = send.new_empty(sum(out_splits))
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    return recv


class RingExchange:
    """Pass a tuple of tensors one step around `group` (to rank+1, from rank-1) asynchronously."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensors: tuple[torch.Tensor, ...], recv_shapes: list[tuple[int, ...]]):
        if torch.compiler.is_compiling():
            return self._start_traceable(tensors, recv_shapes)
        recv = [t.new_empty(s) for t, s in zip(tensors, recv_shapes)]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recv]
        return recv, dist.batch_isend_irecv(ops)

    def _start_traceable(self, tensors, recv_shapes):
        """The same exchange as one all-to-all in which only the next rank gets data and only the
        previous one sends: dynamo cannot trace P2P ops (torch 2.11 has them behind a flag), but
        it turns all_to_all_single into a functional collective whose wait inductor places as
        late as the data allows, so the exchange still overlaps the attention on the current
        block. Same-shaped tensors (K and V) travel stacked, as one piece."""
        n, nxt, prev = self.size, (self.rank + 1) % self.size, (self.rank - 1) % self.size
        if len({tuple(t.shape) for t in tensors}) != 1 or len(set(map(tuple, recv_shapes))) != 1:
            raise ValueError("a traced ring exchange sends tensors of one shape")
        payload = torch.stack(tensors)
        chunks = [payload if j == nxt else payload.new_empty((0,)) for j in range(n)]
        shapes = [(len(tensors), *recv_shapes[0]) if j == prev else (0,) for j in range(n)]
        return list(all_to_all(chunks, shapes, self.group)[prev].unbind(0)), []

    @staticmethod
    def wait(handles) -> None:
        for h in handles:
            h.wait()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's boolean, on every rank of the default group."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_ints(value: int, device: torch.device) -> list[int]:
    """`value` of every rank of the default group, in rank order (e.g. each rank's peak memory)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def mean_over(t: torch.Tensor, groups: list) -> torch.Tensor:
    """Mean of `t` over the ranks of the product of `groups` (one all-reduce per group): the
    value every rank of a sequence- / tensor-parallel branch agrees on."""
    n = 1
    for group in groups:
        t = t.clone()
        dist.all_reduce(t, group=group)
        n *= dist.get_world_size(group)
    return t / n
