"""Whole requests on one GPU, and the time from start to the first image.

    python benchmarks/request.py /tmp/flux-dev --build            # write the random Flux.1-dev once
    python benchmarks/request.py /tmp/flux-dev --compile-cache-dir /tmp/cc [--dit-precision fp8]

One process = one start of the service's stages (the same in-process router `ditserve generate`
uses): it reports the time to load, compile and warm up (--warmup-resolutions, default the
request size), then the latency of --requests requests of 1024x1024 / 28 steps with per-stage
times. Run it twice with the same --compile-cache-dir: the second start is the restart that the
cache is for."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--build", action="store_true", help="write a random-weight Flux.1-dev there first")
    ap.add_argument("--dit-precision", default="default", choices=["default", "fp8"])
    ap.add_argument("--compile-cache-dir")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--requests", type=int, default=3)
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.build:
        from benchmarks.random_checkpoint import build

        build(args.model_dir, "cuda")
        print(f"built {args.model_dir} in {time.perf_counter() - t_start:.0f}s")
        return

    import torch

    from services.cli import build_in_process_router
    from services.runtime.config import GenerateRequest, StageConfig

    width, height = (int(x) for x in args.size.split("x"))
    options = dict(precision=args.dit_precision, compile=not args.no_compile, warmup_resolutions=[args.size])
    if args.compile_cache_dir:
        options["compile_cache_dir"] = args.compile_cache_dir
    device = "cuda" if torch.cuda.is_available() else "cpu"
    router = build_in_process_router(StageConfig(model_path=args.model_dir, device=device), denoiser_options=options)
    ready_s = time.perf_counter() - t_start
    latencies = []
    for i in range(args.requests):
        request = GenerateRequest.parse(prompt="a red circle on a white background", seed=i, height=height,
                                        width=width, num_inference_steps=args.steps)
        t0 = time.perf_counter()
        result = asyncio.run(router.generate(request))
        latencies.append(time.perf_counter() - t0)
        stages = "  ".join(f"{k} {m.seconds:.3f}s" for k, m in result.stages.items())
        print(f"request {i}: {latencies[-1]:.3f}s ({stages})")
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{card}, precision {args.dit_precision}, compile {not args.no_compile}, "
          f"cache {args.compile_cache_dir}: ready after {ready_s:.1f}s (load + compile + warm-up), first image "
          f"after {ready_s + latencies[0]:.1f}s; request {args.size} x {args.steps} steps: "
          f"median {statistics.median(latencies):.3f}s")


if __name__ == "__main__":
    main()
