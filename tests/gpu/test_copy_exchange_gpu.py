"""copy_exchange.py on two GPUs: the copy-engine q/k/v exchange delivers what NCCL's all-to-all
does, called eagerly and replayed from a CUDA graph (slots alternating, each forward's first
exchange fenced), and abort_all releases a barrier whose peer never comes."""

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.servers import free_port

SIZES, B, H, D = [7, 6], 2, 3, 16  # uneven shards, as token counts often are
PART = [3, 2]  # a smaller exchange in the same forward (Z-Image's per-part layers)


def _rank(rank: int, world: int, port: int) -> None:
    from services.denoiser.parallel import copy_exchange
    from services.denoiser.parallel.ulysses import _trade_qkv

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    group = dist.group.WORLD

    def send(seed: int, sizes=SIZES) -> torch.Tensor:
        g = torch.Generator(device).manual_seed(seed * 10 + rank)
        return torch.randn(world, sizes[rank], B, 3, H, D, generator=g, device=device, dtype=torch.bfloat16)

    def expected(x: torch.Tensor, sizes=SIZES) -> torch.Tensor:
        return _trade_qkv(x, sizes, group).view(sum(sizes), B, 3, H, D)

    copy_exchange.use_copy_engine(True)  # as a stage with ulysses_exchange="copy-engine" does
    with torch.inference_mode():  # made in a forward, as the service's are (abort comes from outside it)
        exchange = copy_exchange.exchange_for(group.group_name, device)
    assert exchange is not None

    def finish() -> None:  # as ulysses_finish starts
        torch.cuda.current_stream(device).wait_stream(copy_exchange.side_stream(device))

    # eager: six in a row, sizes alternating, each read before the next is posted, as the model does
    for i in range(6):
        sizes = SIZES if i % 2 == 0 else PART
        x = send(i, sizes)
        got = exchange.post(x, sizes)
        finish()
        assert torch.equal(got, expected(x, sizes)), f"eager exchange {i}"

    # a "forward" of three exchanges captured once, replayed three times in a row
    static = [send(100 + i) for i in range(3)]

    def forward() -> list[torch.Tensor]:
        copy_exchange.begin_forward(group.group_name)
        outs = []
        for x in static:
            recv = exchange.post(x, SIZES)
            finish()
            outs.append(recv * 1)  # read on the main stream, as the attention does
        return outs

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = forward()
    for replay in range(3):
        fresh = [send(200 + 10 * replay + i) for i in range(3)]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        for i, (o, f) in enumerate(zip(outs, fresh)):
            assert torch.equal(o, expected(f)), f"replay {replay}, exchange {i}"

    # a peer that never comes (a dead rank): abort_all lets the barrier go
    dist.barrier()
    if rank == 0:
        threading.Timer(2.0, copy_exchange.abort_all).start()
        start = time.monotonic()
        exchange.barrier()
        torch.cuda.synchronize(device)
        waited = time.monotonic() - start
        assert 1.5 < waited < 30, waited
    dist.barrier()
    graph.reset()
    dist.destroy_process_group()


def test_copy_exchange_delivers_what_nccl_does_and_aborts():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    mp.spawn(_rank, args=(2, free_port()), nprocs=2, join=True)
