"""Serving benchmark: load against a ditserve server, and the cost of the disaggregated path.

    # against a server that is already running
    python benchmarks/serving.py load --url http://127.0.0.1:8000 --concurrency 8 --requests 32 --size 1024x1024

    # the whole comparison on one machine, one table (used for the numbers in the README):
    python benchmarks/serving.py compare --model-path DIR --device cuda --size 1024x1024 --steps 28

`compare` runs, on the same model and seeds: (1) in-process `generate` (router + all stages in
this process), one request at a time; (2) the disaggregated path: encoder, denoiser and VAE as
separate `ditserve worker` processes over gRPC behind a `ditserve serve --no-ray` gateway, one
request at a time through REST; (3) concurrency C against that gateway without batching and
(4) with batching. Latency is client-side wall time."""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def run_load(url: str, concurrency: int, requests: int, size: str, steps: int, seed: int = 0) -> dict:
    """`requests` POSTs with at most `concurrency` in flight; per-request latency and throughput."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    failures: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=3600) as client:

        async def one(i: int):
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/images/generations", json={
                    "prompt": f"benchmark prompt {i}", "size": size, "num_inference_steps": steps, "seed": seed + i})
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    return
                latencies.append(time.perf_counter() - t0)
                batch_sizes.append(r.json()["batch_size"])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, first: {failures[0]}")
    return {
        "requests": requests, "concurrency": concurrency, "wall_s": wall, "img_per_s": requests / wall,
        "p50": percentile(latencies, 0.5), "p90": percentile(latencies, 0.9), "p99": percentile(latencies, 0.99),
        "mean_batch": statistics.mean(batch_sizes),
    }


def in_process_latencies(model_path: str, device: str, size: str, steps: int, n: int) -> list[float]:
    import torch

    from services.cli import build_in_process_router
    from services.gateway.images import encode_image
    from services.runtime.config import GenerateRequest, StageConfig

    w, h = map(int, size.split("x"))
    router = build_in_process_router(StageConfig(model_path=model_path, device=device))
    out = []
    for i in range(n + 1):  # the first request warms up kernels and allocator
        t0 = time.perf_counter()
        result = asyncio.run(router.generate(GenerateRequest(prompt=f"benchmark prompt {i}", width=w, height=h,
                                                             num_inference_steps=steps, seed=i)))
        encode_image(result.images[0].pixels, "png")  # as `ditserve generate` writes its file
        if i:
            out.append(time.perf_counter() - t0)
    del router
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def print_table(rows: list[tuple], header: str) -> None:
    print(header)
    print("| configuration | requests | concurrency | img/s | p50 s | p90 s | p99 s | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['requests']} | {r['concurrency']} | {r['img_per_s']:.3f} | {r['p50']:.3f} | "
              f"{r['p90']:.3f} | {r['p99']:.3f} | {r['mean_batch']:.2f} |")


def compare(args) -> None:
    from tests.servers import start_serve, start_worker

    model = args.model_path
    header = f"\nmodel {model}, {args.size}, {args.steps} steps, device {args.device}"
    if args.device.startswith("cuda"):
        import torch

        header += f" ({torch.cuda.get_device_name(0)})"
    seq = in_process_latencies(model, args.device, args.size, args.steps, args.sequential)
    base = {"requests": len(seq), "concurrency": 1, "wall_s": sum(seq), "img_per_s": len(seq) / sum(seq),
            "p50": percentile(seq, 0.5), "p90": percentile(seq, 0.9), "p99": percentile(seq, 0.99), "mean_batch": 1}

    workers = {r: start_worker(r, model, device=args.device, timeout_s=900) for r in ("encoder", "denoiser", "vae")}
    addresses = [f"--{r}-address=127.0.0.1:{p}" for r, (_, p) in workers.items()]
    rows = [("in-process generate, one at a time", base)]
    try:
        for label, max_batch in (("no batching", 1), ("batching (max 4 images)", 4)):
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                f.write(f"router:\n  batch_window_ms: {args.window_ms}\n  max_batch_size: {max_batch}\n")
            serve, port, _ = start_serve(model, "--config", f.name, *addresses, device=args.device)
            url = f"http://127.0.0.1:{port}"
            try:
                asyncio.run(run_load(url, 1, 1, args.size, args.steps, seed=10_000))  # warm-up
                if max_batch == 1:
                    one = asyncio.run(run_load(url, 1, args.sequential, args.size, args.steps))
                    rows.append(("disaggregated (3 workers, gRPC), one at a time", one))
                for size in args.load_sizes.split(","):
                    load = asyncio.run(run_load(url, args.concurrency, args.requests, size, args.steps))
                    rows.append((f"disaggregated, {size}, concurrency {args.concurrency}, {label}", load))
            finally:
                serve.stop()
    finally:
        for proc, _ in workers.values():
            proc.stop()
    print_table(rows, header)
    added = (rows[1][1]["p50"] / base["p50"] - 1) * 100
    print(f"\ndisaggregated path adds {added:+.1f}% to the median single-request latency")
    n = len(args.load_sizes.split(","))
    for size, plain, batched in zip(args.load_sizes.split(","), rows[2 : 2 + n], rows[2 + n :]):
        print(f"{size}, concurrency {args.concurrency}: batching gives {batched[1]['img_per_s'] / plain[1]['img_per_s']:.2f}x "
              f"the throughput of no batching")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    load = sub.add_parser("load", help="load a running server")
    load.add_argument("--url", required=True)
    cmp_ = sub.add_parser("compare", help="in-process vs disaggregated vs batching, one table")
    cmp_.add_argument("--model-path", required=True)
    cmp_.add_argument("--device", default="cuda")
    cmp_.add_argument("--sequential", type=int, default=3, help="requests for the one-at-a-time rows")
    cmp_.add_argument("--window-ms", type=float, default=10.0)
    cmp_.add_argument("--load-sizes", default="1024x1024", help="comma-separated sizes for the concurrency rows")
    for p in (load, cmp_):
        p.add_argument("--concurrency", type=int, default=8)
        p.add_argument("--requests", type=int, default=16)
        p.add_argument("--size", default="1024x1024")
        p.add_argument("--steps", type=int, default=28)
    args = ap.parse_args()
    if args.cmd == "load":
        r = asyncio.run(run_load(args.url, args.concurrency, args.requests, args.size, args.steps))
        print_table([(f"{args.url}", r)], f"\n{args.size}, {args.steps} steps")
    else:
        compare(args)


if __name__ == "__main__":
    main()
