"""Per-request LoRA and DiT caching on the denoiser's own runner and sampling loop.

    python benchmarks/lora_cache.py                       # Flux.1-dev architecture on a GPU
    python benchmarks/lora_cache.py --model tiny --device cpu --size 64 --steps 4 --cache-steps 8

LoRA (random rank-64 adapters on every attention / MLP linear of the blocks, as trained LoRAs
target them): one denoiser step without LoRA, merged, and unmerged (per-sample updates), at
batch 1 and at batch 4 mixing four adapters; then a workload of 16 requests over 4 adapters at
concurrency 8, served (a) as ditserve does, mixed batches of 4, unmerged, and (b) one merged
adapter at a time (server-global LoRA: a batch holds requests of one adapter, the weights are
re-merged when the adapter changes; the adapters are already in host memory, which favours (b)).

Cache: one request of --cache-steps steps uncached and with each preset; steps skipped, time
and the final latents' relative error against the uncached run."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dit_step import MODELS
from benchmarks.random_checkpoint import materialise
from services.denoiser.compile import compile_blocks
from services.denoiser.latents import PackedLatents2x2, initial_noise
from services.denoiser.loop import sample
from services.denoiser.lora.adapter import LoraAdapter, LoraWeight
from services.denoiser.lora.apply import LoraRunner
from services.denoiser.models.flux import FluxConfig, FluxTransformer
from services.denoiser.parallel.tp import ColumnParallelLinear, RowParallelLinear
from services.denoiser.runner import DenoiserRunner
from services.denoiser.schedule import FlowMatchSchedule
from services.runtime.cache_policy import CachePolicy
from services.runtime.messages import Conditioning

# FLUX.1-dev scheduler/scheduler_config.json
SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                 use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)


def random_adapter(model, name: str, rank: int, seed: int, device) -> LoraAdapter:
    g = torch.Generator(device).manual_seed(seed)
    weights = {}
    for path, m in model.named_modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            weights[path] = LoraWeight(
                down=torch.randn(rank, m.in_features, generator=g, device=device, dtype=torch.bfloat16) * 0.01,
                up=torch.randn(m.out_features, rank, generator=g, device=device, dtype=torch.bfloat16) * 0.01,
            )
    return LoraAdapter(name, weights)


class Bench:
    def __init__(self, args):
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        cfg = FluxConfig.from_dict(MODELS[args.model])
        self.model = materialise(lambda: FluxTransformer(cfg), self.device, self.dtype).eval().requires_grad_(False)
        self.lora = LoraRunner(self.model, self.device)  # before compiling: it names the layers
        if self.device.type == "cuda":
            compile_blocks(self.model)
        self.layout = PackedLatents2x2(cfg.in_channels // 4, 8)
        self.runner = DenoiserRunner(self.model, self.layout, self.device, self.dtype)
        self.schedule = FlowMatchSchedule(SCHEDULER)
        self.cfg, self.size, self.text_len = cfg, args.size, args.text_len

    def inputs(self, batch: int, steps: int, cache=None, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        cond = Conditioning(torch.randn(batch, self.text_len, self.cfg.joint_attention_dim, generator=g),
                            torch.randn(batch, self.cfg.pooled_projection_dim, generator=g))
        h, w = self.layout.latent_hw(self.size, self.size)
        latents = self.layout.pack(initial_noise(list(range(seed, seed + batch)), (self.layout.channels, h, w),
                                                 self.dtype, self.device))
        schedule = self.schedule.for_request(steps, latents.shape[1], self.device)
        resolved = CachePolicy(**cache).resolved(steps) if cache else None
        return latents, self.runner.prepare(cond, None, 3.5, batch, (h, w), resolved), schedule

    def step_ms(self, per_sample, iters: int, merge: bool = True) -> float:
        """Median ms of one step; merge=False forces the per-sample (unmerged) path even for
        a batch with one LoRA set."""
        latents, inputs, schedule = self.inputs(len(per_sample), 1)
        if merge:
            self.lora.use(per_sample, self.dtype)
        else:
            self.lora.activate(per_sample, self.dtype)
        t = schedule.timesteps[0].expand(latents.shape[0]).to(latents.dtype) / 1000
        times = []
        for i in range(iters + 3):
            self._sync()
            t0 = time.perf_counter()
            self.runner.predict(latents, t, inputs)
            self._sync()
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
        self.lora.deactivate()
        return statistics.median(times)

    def request(self, per_sample, steps: int, cache=None, seed: int = 0):
        latents, inputs, schedule = self.inputs(len(per_sample), steps, cache, seed)
        self.lora.use(per_sample, self.dtype)
        try:
            out = sample(self.runner, latents, inputs, schedule, 1.0)
        finally:
            self.lora.deactivate()
        self._sync()
        return out, inputs.cache_stats()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


PARTS = ("steps", "switch", "workload", "cache")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="flux-dev")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=28, help="steps per request in the LoRA workload")
    ap.add_argument("--cache-steps", type=int, default=50)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="which tables (separate processes on separate GPUs can each take one)")
    args = ap.parse_args()
    b = Bench(args)
    adapters = [random_adapter(b.model, f"a{i}", args.rank, i, b.device) for i in range(4)]
    card = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else "cpu"
    print(f"{args.model} {args.size}x{args.size}, {str(b.dtype).removeprefix('torch.')}, {card}, "
          f"LoRA rank {args.rank} on {len(adapters[0].weights)} linears")

    if "steps" in args.parts:
        step_table(b, adapters, args)
    if "switch" in args.parts:
        switch_time(b, adapters)
    if "workload" in args.parts:
        workload(b, adapters, args)
    if "cache" in args.parts:
        cache_table(b, args)


def step_table(b: Bench, adapters, args) -> None:
    one = [(adapters[0], 1.0)]
    rows = [("batch 1, no LoRA", [[]]), ("batch 1, merged", [one])]
    rows_b4 = [("batch 4, no LoRA", [[]] * 4), ("batch 4, 4 adapters mixed (unmerged)", [[(a, 1.0)] for a in adapters])]
    base = {}
    print("| config | ms/step | vs no LoRA |\n|---|---:|---:|")
    for name, per_sample in rows + rows_b4:
        ms = b.step_ms(per_sample, args.iters)
        key = name.split(",")[0]
        base.setdefault(key, ms)
        print(f"| {name} | {ms:.2f} | {(ms / base[key] - 1) * 100:+.1f}% |")
    # unmerged with one adapter at batch 1 (what a mixed batch costs per sample)
    ms = b.step_ms([one], args.iters, merge=False)
    print(f"| batch 1, unmerged | {ms:.2f} | {(ms / base['batch 1'] - 1) * 100:+.1f}% |")



def workload(b: Bench, adapters, args) -> None:
    """16 requests, adapters a0 a1 a2 a3 a0 ..., concurrency 8. Each way of serving runs once
    with one step first, so neither pays a compile (batch 4 / batch 2 shapes) in its timing."""
    order = [adapters[i % 4] for i in range(16)]

    def mixed(steps: int) -> float:  # (a) mixed batches of 4, arrival order
        t0 = time.perf_counter()
        for batch in range(4):
            b.request([[(a, 1.0)] for a in order[batch * 4 : batch * 4 + 4]], steps, seed=batch)
        return time.perf_counter() - t0

    def one_at_a_time(steps: int, switch: list[float]) -> float:
        t0 = time.perf_counter()
        for wave in range(2):  # (b) 8 in flight = 2 per adapter; one adapter's pair per batch, merged
            for a in adapters:
                t1 = time.perf_counter()
                b.lora.merge((a.key, 1.0), [(a, 1.0)])
                b._sync()
                switch.append(time.perf_counter() - t1)
                b.request([[(a, 1.0)]] * 2, steps, seed=wave)
        b.lora.unmerge()
        return time.perf_counter() - t0

    mixed(1)
    one_at_a_time(1, [])
    mixed_s = mixed(args.steps)
    switch: list[float] = []
    merged_s = one_at_a_time(args.steps, switch)
    print(f"\nworkload 16 requests x {args.steps} steps over 4 adapters, concurrency 8: "
          f"mixed unmerged batches of 4 {mixed_s:.1f}s ({16 / mixed_s:.3f} req/s); one merged adapter at a time, "
          f"batches of 2 {merged_s:.1f}s ({16 / merged_s:.3f} req/s, {len(switch)} switches of "
          f"{statistics.median(switch) * 1e3:.0f} ms); ratio {merged_s / mixed_s:.2f}x")


def switch_time(b: Bench, adapters) -> None:
    """What serving one merged adapter at a time pays per change of adapter: restore the
    original weights, merge the next adapter. The first round takes the host copies of the
    originals and is not timed."""
    times = []
    for round_ in range(3):
        for a in adapters:
            t0 = time.perf_counter()
            b.lora.merge((a.key, 1.0), [(a, 1.0)])
            b._sync()
            if round_:
                times.append(time.perf_counter() - t0)
    b.lora.unmerge()
    b._sync()
    print(f"\nadapter switch (restore + merge, {len(adapters[0].weights)} linears): median "
          f"{statistics.median(times) * 1e3:.0f} ms over {len(times)}")


def cache_table(b: Bench, args) -> None:
    print(f"\ncache, one request of {args.cache_steps} steps, batch 1:")
    print("| policy | computed / cached steps | s | speedup | rel err vs uncached |\n|---|---:|---:|---:|---:|")
    b.request([[]], args.cache_steps)  # warm the shapes, uncached and through each preset's path
    for preset in ("slow", "medium", "fast", "ultra"):
        b.request([[]], min(args.cache_steps, 12), cache={"preset": preset})
    t0 = time.perf_counter()
    ref, _ = b.request([[]], args.cache_steps)
    ref_s = time.perf_counter() - t0
    print(f"| uncached | {args.cache_steps} / 0 | {ref_s:.2f} | 1.00x | 0 |")
    for preset in ("slow", "medium", "fast", "ultra"):
        t0 = time.perf_counter()
        out, stats = b.request([[]], args.cache_steps, cache={"preset": preset})
        s = time.perf_counter() - t0
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"| {preset} | {stats.computed_steps} / {stats.cached_steps} | {s:.2f} | {ref_s / s:.2f}x | {err:.3f} |")


if __name__ == "__main__":
    main()
