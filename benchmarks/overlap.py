"""Can a Ulysses exchange run under a GEMM on the same GPU? Two ranks, Flux.1-dev 1024x1024
Ulysses-2 shapes, every variant replayed from a CUDA graph (the service's multi-rank path).

    python benchmarks/overlap.py            # on a machine with 2 GPUs

Rows, us per block: each all-to-all alone (a single block's q/k/v exchange and its output's
way back), the MLP half of a single block's proj_out alone (the work that depends on neither),
the two one after the other on one stream (today's order), and the all-to-all issued on a side
stream while the GEMM runs, with cuBLAS told to leave 0 / 8 / 16 / 32 SMs free for NCCL
(torch._C._set_sm_carveout_experimental). Also the attention of half the queries beside the
output's exchange (the other way to hide it). Overlap pays where "side stream" is below "serial".

    python benchmarks/overlap.py copy       # only the copy-engine rows

The copy-engine rows move the q/k/v exchange without NCCL: each rank copies its chunk for the
other straight into the other's receive buffer (torch symmetric memory maps it; a contiguous
copy_ is a cudaMemcpyAsync, run by a copy engine, no SMs), then a device-side barrier. If that
hides under a GEMM where NCCL's kernel does not, it is the way to hide the q/k/v exchange."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENS, HEADS, HEAD_DIM, DIM, HIDDEN = 4608, 24, 128, 3072, 12288
REPS = 20


def timed_graph(fn, device) -> float:
    """us per call of fn, replayed REPS times from one CUDA graph, median of 5 replays."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()  # warm-up outside capture (NCCL, cuBLAS handles)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    times = []
    for _ in range(6):
        dist.barrier()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / REPS)
    return sorted(times[1:])[2]


def rank_main(rank: int, world: int, port: int, only_copy: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    s, h = TOKENS // world, HEADS // world
    bf = dict(dtype=torch.bfloat16, device=device)
    qkv_send = torch.randn(world * s * 3 * h * HEAD_DIM, **bf)
    qkv_recv = torch.empty_like(qkv_send)
    out_send = torch.randn(world * s * h * HEAD_DIM, **bf)
    out_recv = torch.empty_like(out_send)
    mlp = torch.randn(s, HIDDEN, **bf)
    w_m = torch.randn(DIM, HIDDEN, **bf) / HIDDEN**0.5
    y = torch.empty(s, DIM, **bf)
    q, k, v = (torch.randn(1, h, TOKENS, HEAD_DIM, **bf) for _ in range(3))
    side = torch.cuda.Stream(device)

    def a2a_qkv():
        dist.all_to_all_single(qkv_recv, qkv_send)

    def a2a_out():
        dist.all_to_all_single(out_recv, out_send)

    def gemm(carveout=None):
        def run():
            torch._C._set_sm_carveout_experimental(carveout)
            torch.mm(mlp, w_m.t(), out=y)
            torch._C._set_sm_carveout_experimental(None)
        return run

    def half_attention():
        F.scaled_dot_product_attention(q[:, :, : TOKENS // 2], k, v)

    def beside(comm, compute):
        def run():
            main = torch.cuda.current_stream(device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                comm()
            compute()
            main.wait_stream(side)
        return run

    def serial(*fns):
        def run():
            for f in fns:
                f()
        return run

    if only_copy:
        rows = []
    else:
        rows = _nccl_rows(a2a_qkv, a2a_out, gemm, half_attention, beside, serial)
    rows += _copy_engine_rows(qkv_send, gemm, beside, serial, rank, world, device)
    env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_") and "CTA" in k}
    if rank == 0:
        print(f"Ulysses-{world} single-block shapes, {torch.cuda.get_device_name(device)}, NCCL {env or 'defaults'}")
    for name, fn in rows:
        try:
            us = timed_graph(fn, device)
        except Exception as exc:  # a row that cannot run says why; the others still run
            if rank == 0:
                print(f"  {name:<62} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
            continue
        if rank == 0:
            print(f"  {name:<62} {us:8.1f} us", flush=True)
    dist.destroy_process_group()


def _copy_engine_rows(qkv_send, gemm, beside, serial, rank, world, device):
    try:
        import torch.distributed._symmetric_memory as symm_mem

        recv = symm_mem.empty(qkv_send.numel(), dtype=qkv_send.dtype, device=device)
        handle = symm_mem.rendezvous(recv, dist.group.WORLD.group_name)
    except Exception as exc:
        if rank == 0:
            print(f"  symmetric memory unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return []
    peers = [handle.get_buffer(j, (qkv_send.numel(),), qkv_send.dtype) for j in range(world)]

    def copy_exchange(send=qkv_send, ready_first=False):
        def run():
            part = send.numel() // world
            if ready_first:  # every rank done reading its receive buffer before anyone writes it
                handle.barrier(channel=1)
            for j in range(world):  # my chunk for rank j into slot `rank` of j's receive buffer
                peers[j][rank * part : (rank + 1) * part].copy_(send[j * part : (j + 1) * part])
            handle.barrier(channel=0)
        return run

    out_send = qkv_send[: qkv_send.numel() // 3]  # the output's exchange is a third of q/k/v's
    h = HEADS // world
    q, k, v = (torch.randn(1, h, TOKENS, HEAD_DIM, dtype=qkv_send.dtype, device=device) for _ in range(3))

    def half_attention():
        torch.nn.functional.scaled_dot_product_attention(q[:, :, : TOKENS // 2], k, v)

    return [
        ("copy engine: q/k/v exchange alone", copy_exchange()),
        ("serial: copy-engine exchange + GEMM", serial(copy_exchange(), gemm())),
        ("side stream: copy-engine exchange beside GEMM", beside(copy_exchange(), gemm())),
        ("copy engine, barrier before and after: alone", copy_exchange(ready_first=True)),
        ("  ... beside GEMM", beside(copy_exchange(ready_first=True), gemm())),
        ("copy engine: output exchange alone", copy_exchange(out_send)),
        ("  ... beside half attention", beside(copy_exchange(out_send), half_attention)),
    ]


def _nccl_rows(a2a_qkv, a2a_out, gemm, half_attention, beside, serial):
    rows = [
        ("q/k/v all-to-all alone", a2a_qkv),
        ("output all-to-all alone", a2a_out),
        ("MLP GEMM alone", gemm()),
        ("MLP GEMM alone, 8 SMs left", gemm(8)),
        ("MLP GEMM alone, 16 SMs left", gemm(16)),
        ("serial: q/k/v all-to-all + GEMM", serial(a2a_qkv, gemm())),
    ]
    for c in (None, 8, 16, 32):
        rows.append((f"side stream: q/k/v all-to-all beside GEMM, {c or 0} SMs left", beside(a2a_qkv, gemm(c))))
    rows += [
        ("serial: output all-to-all + GEMM", serial(a2a_out, gemm())),
        ("side stream: output all-to-all beside GEMM, 8 SMs left", beside(a2a_out, gemm(8))),
        ("half attention alone", half_attention),
        ("serial: output all-to-all + half attention", serial(a2a_out, half_attention)),
        ("side stream: output all-to-all beside half attention", beside(a2a_out, half_attention)),
    ]
    return rows


if __name__ == "__main__":
    world = torch.cuda.device_count()
    if world < 2:
        sys.exit("needs 2 GPUs")
    mp.spawn(rank_main, args=(2, 29517, sys.argv[1:] == ["copy"]), nprocs=2)
