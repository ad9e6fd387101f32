"""Multi-GPU rows of dit_step.py: several parallel layouts of one world, in one run.

    python benchmarks/dit_step.py --layouts ulysses4 ring2xulysses2 tp2xulysses2 cfg2xulysses2

One process per GPU; every layout uses all of them. Each rank loads the whole model once; a
layout builds its own process groups on the same world (and a tensor-parallel layout its own
shard of the same weights), and runs through the service's DenoiserRunner. Rows, compiled
unless --eager:

- ditserve on 1 GPU: one forward, and (when a cfg layout is asked for) a true-CFG step, the
  positive and negative branches one after the other as the 1-GPU runner does them;
- ditserve in each layout (a cfg layout does the true-CFG step: one branch per half);
- fp8 for the layouts named in --fp8-layouts;
- diffusers' context parallelism (ContextParallelConfig) at the same degree: ring x ulysses as
  the layout has them, or Ulysses over every GPU for a layout with tp or cfg (diffusers has
  neither); for a cfg layout diffusers runs its two branches one after the other, as its
  Flux pipeline does.

First, the machine's all-to-all bandwidth over all GPUs at the size of one Ulysses q/k/v
exchange: the same code's multi-GPU rows differed by up to 1.7x between machines, with
diffusers' rows moving alike, so each table carries the figure that explains its own rows.

Rank 0 prints each row as it is measured (a run cut short keeps what it had) and a table at the
end: speed-up and scaling efficiency against ditserve's own 1-GPU step of the same kind, ratio
to diffusers at the same degree, relative error of the positive branch against 1 GPU."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from benchmarks.dit_step import MODELS, build_models, diffusers_forward, make_inputs, step_flops, timed
from services.denoiser.compile import compile_blocks
from services.denoiser.latents import PackedLatents2x2
from services.denoiser.models.flux import FluxConfig, FluxTransformer
from services.denoiser.parallel import copy_exchange
from services.denoiser.parallel.mesh import ParallelDegrees, ParallelMesh
from services.denoiser.runner import DenoiserRunner
from services.runtime.messages import Conditioning

DIMS = ("cfg", "ring", "ulysses", "tp")


def parse_layout(text: str) -> ParallelDegrees:
    """"ring2xulysses2" -> ParallelDegrees(ring=2, ulysses=2); "cfg2" is cfg parallelism."""
    degrees = {}
    for part in text.split("x"):
        name = part.rstrip("0123456789")
        if name not in DIMS or name == part or name in degrees:
            raise ValueError(f"bad layout {text!r}: expected parts like ulysses4, ring2, tp2, cfg2 joined by 'x'")
        degrees[name] = int(part[len(name):])
    return ParallelDegrees(**degrees)


def layout_name(d: ParallelDegrees) -> str:
    return "x".join(f"{k}{getattr(d, k)}" for k in DIMS if getattr(d, k) > 1) or "1 GPU"


@dataclass
class Row:
    name: str
    ms: float
    peak: int
    gpus: int
    cfg: bool  # a true-CFG step (two branches)
    out: torch.Tensor  # positive branch
    first_s: float
    vs_diffusers: str = ""  # the diffusers row at the same degree


class Runs:
    """Times a step on every rank (barrier before and after) and keeps rank 0's rows."""

    def __init__(self, args, device: torch.device, rank: int):
        self.args, self.device, self.rank = args, device, rank
        self.rows: dict[str, Row] = {}

    def run(self, name: str, fn, gpus: int, cfg: bool, vs_diffusers: str = "") -> bool:
        dist.barrier()
        t0 = time.perf_counter()
        try:
            ms, peak, out = timed(fn, self.device, self.args.warmup, self.args.iters)
        except Exception as exc:  # a row that cannot run is reported, not fatal
            if self.rank == 0:
                print(f"{name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            dist.barrier()
            return False
        dist.barrier()
        if self.args.profile and self.device.type == "cuda" and name.startswith("ditserve"):
            kernel_profile(name, fn, self.rank, self.args.trace_dir, top=self.args.profile_top)
        out = out[0] if isinstance(out, list) else out
        row = Row(name, ms, peak, gpus, cfg, out.float(), time.perf_counter() - t0, vs_diffusers)
        self.rows[name] = row
        if self.rank == 0:
            print(f"{name}: {ms:.2f} ms/step, peak {peak / 2**30:.2f} GiB, warm-up + timed {row.first_s:.1f} s",
                  flush=True)
        return True

    def print_table(self, title: str, flops: float) -> None:
        print(title)
        print("| config | GPUs | ms/step | vs ditserve 1 GPU | scaling efficiency | vs diffusers same degree "
              "| TFLOP/s per GPU | peak GiB (rank 0) | rel err vs 1 GPU |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        def mode(r: Row) -> str:  # each row against the 1-GPU row run the same way
            return "eager" if r.name.endswith("eager") else "graphs" if r.name.endswith("graphs") else "compiled"

        one = {(mode(r), r.cfg): r for r in self.rows.values() if r.gpus == 1}
        for r in self.rows.values():
            base = one.get((mode(r), r.cfg))
            speedup = base.ms / r.ms if base else float("nan")
            d = self.rows.get(r.vs_diffusers) or self.rows.get(r.vs_diffusers.replace(" compiled", " eager"))
            vs_d = f"{d.ms / r.ms:.2f}x" if d and d is not r else "-"
            err = ((r.out - base.out).norm() / base.out.norm()).item() if base else float("nan")
            step_flops_ = flops * (2 if r.cfg else 1)
            print(f"| {r.name} | {r.gpus} | {r.ms:.2f} | {speedup:.2f}x | {speedup / r.gpus * 100:.0f}% | {vs_d} | "
                  f"{step_flops_ / r.ms / 1e9 / r.gpus:.0f} | {r.peak / 2**30:.2f} | {err:.1e} |")


KERNEL_KINDS = (  # (category, substrings of the kernel names), first match wins
    ("nccl", ("nccl",)),
    ("attention", ("cudnn", "flash", "fmha", "attention")),
    ("gemm", ("gemm", "nvjet", "sm90_xmma", "cutlass", "matmul")),
    ("triton", ("triton",)),
)


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            total += 0.0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (0.0 if cur_e is None else cur_e - cur_s)


def kernel_profile(name: str, fn, rank: int, trace_dir: str | None = None, steps: int = 3, top: int = 0) -> None:
    """Rank 0's GPU time per step: by kernel kind, and how much of the communication ran under
    compute ("hidden") or alone ("exposed"); "idle" is the step's time with no kernel at all.
    `top`: also the `top` kernels by time, by name."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as scratch:  # the trace is read back from its file
        os.makedirs(trace_dir or scratch, exist_ok=True)
        path = os.path.join(trace_dir or scratch, name.replace(" ", "_") + ".json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            kernels = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]
    if not kernels:
        return
    totals: dict[str, float] = {}
    spans: dict[bool, list] = {True: [], False: []}  # is communication -> intervals
    for e in kernels:
        kind = next((k for k, keys in KERNEL_KINDS if any(s in e["name"].lower() for s in keys)), "other")
        totals[kind] = totals.get(kind, 0.0) + e["dur"]
        spans[kind == "nccl"].append((e["ts"], e["ts"] + e["dur"]))
    compute, comm = _busy(spans[False]), _busy(spans[True])
    anything = _busy(spans[False] + spans[True])
    wall = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    per = 1e3 * steps  # us over `steps` steps -> ms per step
    print(f"{name} GPU ms per step: " + ", ".join(f"{k} {v / per:.1f}" for k, v in sorted(totals.items()))
          + f"; compute busy {compute / per:.1f}, communication hidden {(compute + comm - anything) / per:.1f} / "
          f"exposed {(anything - compute) / per:.1f}, idle {(wall - anything) / per:.1f}", flush=True)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e["name"], []).append(e["dur"])
    for kname, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"    {sum(durs) / per:6.2f} ms  {len(durs) // steps:5d} x  {kname[:110]}")


def alltoall_gb_s(nbytes: int, device: torch.device, iters: int = 20) -> float:
    """Bytes each rank sends and receives per second in an all-to-all over the default group
    of `nbytes` per rank (the 1/world share each keeps counts as sent, as NCCL's algbw does)."""
    send = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    recv = torch.empty_like(send)
    for _ in range(3):
        dist.all_to_all_single(recv, send)
    torch.cuda.synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_to_all_single(recv, send)
    torch.cuda.synchronize(device)
    return nbytes * iters / (time.perf_counter() - t0) / 1e9


def parallel_rank(rank: int, args, port: int) -> None:
    """One rank of a multi-GPU run; rank 0 prints."""
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    layouts = [parse_layout(s) for s in args.layouts]
    world = layouts[0].world_size
    cuda = args.device.startswith("cuda")
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600),
                            device_id=device if cuda else None)
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg_dict = MODELS[args.model]
    cfg = FluxConfig.from_dict(cfg_dict)
    ref, native = build_models(cfg_dict, device, dtype)
    inp = make_inputs(cfg, args.height, args.width, args.text_len, args.batch, device, dtype)
    g = torch.Generator(device).manual_seed(2)
    negative = Conditioning(torch.randn(inp["ctx"].shape, generator=g, device=device, dtype=dtype),
                            torch.randn(inp["pooled"].shape, generator=g, device=device, dtype=dtype))
    positive = Conditioning(inp["ctx"], inp["pooled"])
    layout = PackedLatents2x2(cfg.in_channels // 4, vae_scale_factor=8)
    h, w = layout.latent_hw(args.height, args.width)
    any_cfg = any(d.cfg > 1 for d in layouts)
    runs = Runs(args, device, rank)
    if cuda:
        # q, k and v of this rank's 1/world of the [text; image] tokens, as one Ulysses exchange sends them
        qkv_bytes = 3 * (inp["x"].shape[1] + args.text_len) // world * cfg.inner_dim * 2 * args.batch
        for nbytes in (qkv_bytes, 64 << 20):
            gb_s = alltoall_gb_s(nbytes, device)
            if rank == 0:
                print(f"NCCL all-to-all over {world} GPUs, {nbytes / 2**20:.1f} MiB per rank: {gb_s:.0f} GB/s per rank")
    modes = (["eager"] if args.eager else []) + (["compiled"] if not args.no_compile else [])

    def ditserve(model, mesh, with_cfg: bool, graphs: bool = False, outside: bool = False):
        runner = DenoiserRunner(model, layout, device, dtype, mesh, cuda_graphs=graphs, variable_text=outside)
        inputs = runner.prepare(positive, negative if with_cfg else None, 3.5, args.batch, (h, w), None)
        # as the service runs a request: its modulations tabulated before the steps (this step's row)
        runner.precompute(inputs, inp["t"][None])
        return lambda: runner.predict(inp["x"], inp["t"], inputs, step=0)

    meshes = {d: ParallelMesh(d, device.type) for d in layouts}  # every rank builds every group, in order
    models = {d: native if d.tp == 1 else tp_shard(cfg, ref, meshes[d]) for d in layouts}
    for mode in modes:
        if mode == "compiled":  # as the service compiles a multi-rank replica
            for m in {id(m): m for m in [native, *models.values()]}.values():
                compile_blocks(m, overlap_comm=True)
        # CUDA graphs need a compiled (or at least warmed-up) CUDA forward: compiled rows only
        for graphs in (False, True) if args.cuda_graphs and mode == "compiled" and cuda else (False,):
            tag = f"{mode}{' + CUDA graphs' if graphs else ''}"
            runs.run(f"ditserve 1 GPU {tag}", ditserve(native, None, False, graphs), 1, False)
            if any_cfg:
                runs.run(f"ditserve 1 GPU true-CFG {tag}", ditserve(native, None, True, graphs), 1, True)
            for d in layouts:
                for repeat in range(args.repeat):  # repeated rows show the machine's run-to-run spread
                    runs.run(f"ditserve {layout_name(d)}{f' #{repeat + 1}' if repeat else ''} {tag}",
                             ditserve(models[d], meshes[d], d.cfg > 1, graphs), world, d.cfg > 1,
                             vs_diffusers=f"diffusers CP {layout_name(diffusers_degrees(d, world))}"
                             + (" true-CFG" if d.cfg > 1 else "") + " compiled")
                if graphs and args.copy_engine and d.ulysses > 1:
                    copy_exchange.use_copy_engine(True)  # for the graphs this row captures
                    runs.run(f"ditserve {layout_name(d)} {tag}, copy-engine exchange",
                             ditserve(models[d], meshes[d], d.cfg > 1, graphs), world, d.cfg > 1)
                    copy_exchange.use_copy_engine(False)
                if args.sp_outside_graphs and meshes[d].sp_size > 1:
                    runs.run(f"ditserve {layout_name(d)}, exchanges outside graphs {tag}",
                             ditserve(models[d], meshes[d], d.cfg > 1, graphs, outside=True), world, d.cfg > 1)
    if cuda:
        from services.denoiser.quant import apply_precision

        for d in (parse_layout(s) for s in args.fp8_layouts):
            if d not in meshes:
                continue
            with torch.device("meta"):
                fp8 = FluxTransformer(cfg, tp=models[d].transformer_blocks[0].attn.to_q.tp)
            fp8.load_state_dict(models[d].state_dict(), strict=True, assign=True)
            apply_precision(fp8.eval().requires_grad_(False), "fp8")
            if not args.no_compile:
                compile_blocks(fp8, overlap_comm=True)
            for graphs in (False, True) if args.cuda_graphs and not args.no_compile else (False,):
                runs.run(f"ditserve {layout_name(d)} fp8 compiled{' + CUDA graphs' if graphs else ''}",
                         ditserve(fp8, meshes[d], d.cfg > 1, graphs), world, d.cfg > 1)
    if not args.no_diffusers:
        run_diffusers(runs, cfg_dict, ref, inp, negative, layouts, world)
    if rank == 0:
        card = torch.cuda.get_device_name(device) if cuda else "cpu"
        runs.print_table(
            f"\n{args.model} {args.height}x{args.width} ({inp['x'].shape[1]} image + {args.text_len} text tokens), "
            f"batch {args.batch}, {str(dtype).removeprefix('torch.')}, {world}x {card}, torch {torch.__version__}; "
            f"{step_flops(cfg, inp['x'].shape[1], args.text_len, args.batch) / 1e12:.1f} TFLOP per forward",
            step_flops(cfg, inp["x"].shape[1], args.text_len, args.batch))
    dist.destroy_process_group()


def tp_shard(cfg: FluxConfig, ref, mesh: ParallelMesh) -> FluxTransformer:
    """This rank's tensor-parallel shard of the same weights."""
    from services.denoiser.parallel.tp import TensorParallel, shard_state_dict

    with torch.device("meta"):
        model = FluxTransformer(cfg, tp=TensorParallel(mesh.group("tp")))
    model.load_state_dict(shard_state_dict(model, ref.state_dict()), assign=True)
    return model.eval().requires_grad_(False)


def diffusers_degrees(d: ParallelDegrees, world: int) -> ParallelDegrees:
    """diffusers' context parallelism at the same number of GPUs."""
    return ParallelDegrees(ring=d.ring, ulysses=d.ulysses) if d.tp == 1 and d.cfg == 1 else ParallelDegrees(ulysses=world)


def run_diffusers(runs: Runs, cfg_dict: dict, ref, inp: dict, negative: Conditioning, layouts, world: int) -> None:
    """One fresh diffusers model per context-parallel config (sharing the weights), compiled."""
    try:
        from diffusers import ContextParallelConfig, FluxTransformer2DModel
    except ImportError as exc:
        if runs.rank == 0:
            print(f"no diffusers rows: {exc}")
        return
    if runs.device.type != "cuda":  # diffusers places its mesh on torch.accelerator devices only
        if runs.rank == 0:
            print("no diffusers rows: diffusers' context parallelism needs an accelerator")
        return
    wanted: dict[ParallelDegrees, bool] = {}
    for d in layouts:
        cp = diffusers_degrees(d, world)
        wanted[cp] = wanted.get(cp, False) or d.cfg > 1
    def build(cp: ParallelDegrees, compiled: bool):
        with torch.device("meta"):
            model = FluxTransformer2DModel(**cfg_dict)
        model.load_state_dict(ref.state_dict(), assign=True)
        model.eval().requires_grad_(False)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=cp.ulysses, ring_degree=cp.ring))
        if compiled:
            model.compile_repeated_blocks(fullgraph=True)
        return model

    for cp, with_cfg in wanted.items():
        for mode in ("compiled", "eager"):  # eager only where diffusers' own compile fails
            name = f"diffusers CP {layout_name(cp)}"
            try:
                model = build(cp, mode == "compiled")
            except Exception as exc:  # reported, not fatal: the ditserve rows stand on their own
                if runs.rank == 0:
                    print(f"{name} {mode}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue

            ok = runs.run(f"{name} {mode}", lambda model=model: diffusers_forward(model, inp), world, False)
            if ok and with_cfg:  # the Flux pipeline's true CFG: positive, then negative
                runs.run(f"{name} true-CFG {mode}",
                         lambda model=model: [diffusers_forward(model, inp),
                                              diffusers_forward(model, inp, negative.prompt_embeds,
                                                                negative.pooled_prompt_embeds)], world, True)
            if ok:
                break
