"""One denoiser step: ditserve's native DiT against diffusers on the same random weights.

    python benchmarks/dit_step.py --model flux-dev --device cuda --height 1024 --width 1024
    python benchmarks/dit_step.py --model tiny --device cpu --height 256 --width 256

Both models share one set of weight tensors (the native module is loaded from diffusers'
state dict with assign=True), so peak memory is directly comparable. Rows: diffusers eager,
diffusers compiled (compile_repeated_blocks), ditserve eager[, ditserve compiled]. Each row
also reports its output's relative error against diffusers eager on the same inputs.

    python benchmarks/dit_step.py --model flux-dev --ulysses-degree 2 [--ring-degree R] [--tp-size T] [--cfg-parallel]
    python benchmarks/dit_step.py --layouts ulysses4 ring2xulysses2 tp2xulysses2 cfg2xulysses2

runs one process per GPU (benchmarks/dit_parallel.py): ditserve on 1 GPU and in each layout over
all of them, against diffusers' own context parallelism (ContextParallelConfig) at the same
degree, in the same run. `--profile` adds, per ditserve row, rank 0's GPU time by kernel kind
and how much of the communication ran under compute (`--trace-dir D` keeps the Chrome traces);
`--repeat N` runs each layout's row N times, to see the machine's spread within the run;
`--cuda-graphs` adds each compiled ditserve row again with its forwards replayed as CUDA graphs
(the service's default for a multi-rank replica), on one GPU as on several; `--profile` prints
each compiled ditserve row's GPU time by kernel kind.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.random_checkpoint import materialise  # noqa: E402
from services.denoiser.attention import attention_precision  # noqa: E402
from services.denoiser.graphs import ForwardGraphs  # noqa: E402
from services.denoiser.latents import PackedLatents2x2  # noqa: E402
from services.denoiser.models.flux import FluxConfig, FluxTransformer  # noqa: E402

MODELS = {
    # black-forest-labs/FLUX.1-dev transformer/config.json
    "flux-dev": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    "flux-schnell": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    ),
    "tiny": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
}


def step_flops(cfg: FluxConfig, n_img: int, n_txt: int, batch: int) -> float:
    """Matmul FLOPs of one forward: every block does 24*N*d^2 (projections + MLP) + 4*N^2*d (attention)."""
    n, d = n_img + n_txt, cfg.inner_dim
    return batch * (cfg.num_layers + cfg.num_single_layers) * (24 * n * d * d + 4 * n * n * d)


def build_models(cfg_dict: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    ref = materialise(lambda: FluxTransformer2DModel(**cfg_dict), device, dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        native = FluxTransformer(FluxConfig.from_dict(cfg_dict))
    native.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, native.eval().requires_grad_(False)


def make_inputs(cfg: FluxConfig, height: int, width: int, text_len: int, batch: int, device, dtype):
    layout = PackedLatents2x2(cfg.in_channels // 4, vae_scale_factor=8)
    h, w = layout.latent_hw(height, width)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(batch, (h // 2) * (w // 2), cfg.in_channels, generator=g, device=device, dtype=dtype)
    ctx = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g, device=device, dtype=dtype)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g, device=device, dtype=dtype)
    t = torch.full((batch,), 0.5, device=device, dtype=dtype)
    guidance = torch.full((batch,), 3.5, device=device, dtype=torch.float32) if cfg.guidance_embeds else None
    return dict(
        x=x, ctx=ctx, pooled=pooled, t=t, guidance=guidance,
        img_ids=layout.image_ids(h, w, device), txt_ids=layout.text_ids(text_len, device),
    )


def diffusers_forward(ref, inp: dict, ctx=None, pooled=None) -> torch.Tensor:
    """diffusers' FluxTransformer2DModel on make_inputs' tensors (another prompt's ctx / pooled if given)."""
    with torch.inference_mode():
        return ref(
            hidden_states=inp["x"], encoder_hidden_states=inp["ctx"] if ctx is None else ctx,
            pooled_projections=inp["pooled"] if pooled is None else pooled, timestep=inp["t"],
            img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=inp["guidance"], return_dict=False,
        )[0]


def timed(fn, device: torch.device, warmup: int, iters: int) -> tuple[float, int, torch.Tensor]:
    """Median ms per call, peak bytes allocated during the timed calls, and the last output."""
    for _ in range(warmup):
        out = fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), peak, out


def matmul_ceiling(device: torch.device) -> dict[str, float]:
    """Measured TFLOP/s of a large square matmul on this card, bf16 and fp8 (row-wise scales):
    the ceiling the step's TFLOP/s is compared with."""
    if device.type != "cuda":
        return {}
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = {"bf16": 2 * n**3 / timed(lambda: a @ b, device, 3, 20)[0] / 1e9}
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
    out["fp8"] = 2 * n**3 / timed(lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                                  device, 3, 20)[0] / 1e9
    return out


def host_to_device_gib_s(device: torch.device) -> float:
    if device.type != "cuda":
        return float("inf")
    host = torch.empty(2**30, dtype=torch.uint8).pin_memory()
    dev = torch.empty(2**30, dtype=torch.uint8, device=device)
    return 1.0 / (timed(lambda: dev.copy_(host, non_blocking=True), device, 2, 5)[0] / 1e3)


class Table:
    """Rows of one run. Ratios are against the diffusers rows of the same run; rel err is against
    the row named in `err_vs` (diffusers eager unless the row says otherwise)."""

    def __init__(self, device, iters: int, flops: float, ceiling: dict[str, float]):
        self.device, self.iters, self.flops, self.ceiling = device, iters, flops, ceiling
        self.rows: list[tuple] = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.ms: dict[str, float] = {}

    def run(self, name: str, fn, warmup: int, precision: str = "bf16", err_vs: str = "diffusers eager",
            not_mine_bytes: int = 0) -> None:
        """`not_mine_bytes`: device memory held only for other rows, left out of this row's peak."""
        try:
            t0 = time.perf_counter()
            ms, peak, out = timed(fn, self.device, warmup, self.iters)
            first_s = time.perf_counter() - t0
        except Exception as exc:  # a row that cannot run is reported, not fatal
            self.rows.append((name, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
            return
        out, peak = out.float(), peak - not_mine_bytes if peak else 0  # 0: no device statistics (CPU)
        self.outputs[name], self.ms[name] = out, ms
        ref = self.outputs.get(err_vs, out)
        err = ((out - ref).norm() / ref.norm()).item()
        self.rows.append((name, (ms, peak, err, err_vs if name != err_vs else "", first_s, precision), None))

    def print(self, title: str) -> None:
        print(title)
        if self.ceiling:
            print("matmul ceiling measured in this run (8192^3): "
                  + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in self.ceiling.items()))
        eager, compiled = self.ms.get("diffusers eager"), self.ms.get("diffusers compiled")
        print("| config | ms/step | vs diffusers eager | vs diffusers compiled | TFLOP/s | % of ceiling | peak GiB "
              "| rel err | vs | warm-up+timed s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for name, res, failure in self.rows:
            if res is None:
                print(f"| {name} | failed: {failure} |")
                continue
            ms, peak, err, vs, first_s, precision = res
            tflops = self.flops / ms / 1e9
            pct = f"{tflops / self.ceiling[precision] * 100:.0f}% ({precision})" if precision in self.ceiling else "-"
            print(f"| {name} | {ms:.2f} | {_ratio(eager, ms)} | {_ratio(compiled, ms)} | {tflops:.0f} | {pct} | "
                  f"{peak / 2**30:.2f} | {err:.1e} | {vs} | {first_s:.1f} |")


def _ratio(base: float | None, ms: float) -> str:
    return f"{base / ms:.2f}x" if base else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="flux-dev")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    ap.add_argument("--no-fp8", action="store_true", help="skip the fp8 row")
    ap.add_argument("--qk-ab", action="store_true",
                    help="also the bf16 compiled rows with q and k by inductor instead of qk_norm.py's kernel")
    ap.add_argument("--fp8-attention", action="store_true",
                    help="also the fp8 row with fp8 attention (--dit-attention-precision fp8; needs cudnn-frontend)")
    ap.add_argument("--offload", action="store_true",
                    help="layerwise offload against the resident model (ditserve only; no diffusers rows)")
    ap.add_argument("--prefetch", type=int, nargs="+", default=[1, 2], help="offload prefetch depths to run")
    ap.add_argument("--ulysses-degree", type=int, default=1, help="> 1: a multi-GPU run (one process per GPU)")
    ap.add_argument("--ring-degree", type=int, default=1)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--cfg-parallel", action="store_true", help="the two CFG branches on the two halves of the GPUs")
    ap.add_argument("--layouts", nargs="+", default=[],
                    help="several layouts of the same GPU count in one run, e.g. ulysses4 ring2xulysses2 tp2xulysses2")
    ap.add_argument("--fp8-layouts", nargs="*", default=None, help="layouts that also get an fp8 row (default: the first)")
    ap.add_argument("--eager", action="store_true", help="multi-GPU: eager rows as well")
    ap.add_argument("--repeat", type=int, default=1, help="multi-GPU: run each layout's row this many times")
    ap.add_argument("--profile", action="store_true",
                    help="GPU time per kernel kind for each compiled ditserve row (multi-GPU: rank 0's, and how much "
                         "of the communication ran under compute)")
    ap.add_argument("--profile-top", type=int, default=18, help="with --profile: how many kernels to list (rank 0)")
    ap.add_argument("--trace-dir", default=None, help="with --profile: rank 0's Chrome traces, one per row")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="each compiled ditserve row also with whole forwards as CUDA graphs")
    ap.add_argument("--sp-outside-graphs", action="store_true",
                    help="multi-GPU: each layout again with its exchanges outside the compiled graphs, as a "
                         "variable-text model (Qwen-Image, Z-Image) runs them")
    ap.add_argument("--no-diffusers", action="store_true", help="multi-GPU: skip diffusers' context parallelism")
    ap.add_argument("--copy-engine", action="store_true",
                    help="multi-GPU with --cuda-graphs: each Ulysses layout's graphed row again with the q/k/v "
                         "exchange by copy engine (--ulysses-exchange copy-engine)")
    args = ap.parse_args()
    if not args.layouts and args.ulysses_degree * args.ring_degree * args.tp_size * (2 if args.cfg_parallel else 1) > 1:
        args.layouts = ["x".join(f"{k}{v}" for k, v in (("cfg", 2 if args.cfg_parallel else 1),
                                                        ("ring", args.ring_degree), ("ulysses", args.ulysses_degree),
                                                        ("tp", args.tp_size)) if v > 1)]
    if args.layouts:
        run_parallel(args)
        return
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    (run_offload if args.offload else run_single)(args, device, dtype)


def run_parallel(args) -> None:
    import socket

    import torch.multiprocessing as mp

    from benchmarks.dit_parallel import parallel_rank, parse_layout

    sizes = {parse_layout(s).world_size for s in args.layouts}
    if len(sizes) != 1:
        raise SystemExit(f"--layouts must all use the same number of GPUs, got {sorted(sizes)}")
    if args.fp8_layouts is None:
        args.fp8_layouts = args.layouts[:1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(parallel_rank, args=(args, port), nprocs=sizes.pop())


def run_single(args, device: torch.device, dtype: torch.dtype) -> None:
    """diffusers eager / compiled, ditserve eager / compiled, ditserve fp8 compiled."""
    from services.denoiser.compile import compile_blocks
    from services.denoiser.quant import apply_precision

    cfg_dict = MODELS[args.model]
    cfg = FluxConfig.from_dict(cfg_dict)
    t_build = time.perf_counter()
    ref, native = build_models(cfg_dict, device, dtype)
    build_s = time.perf_counter() - t_build
    inp = make_inputs(cfg, args.height, args.width, args.text_len, args.batch, device, dtype)
    n_img = inp["x"].shape[1]
    table = Table(device, args.iters, step_flops(cfg, n_img, args.text_len, args.batch), matmul_ceiling(device))

    def diffusers_step():
        return diffusers_forward(ref, inp)

    with torch.inference_mode():
        rope = native.rope(inp["txt_ids"], inp["img_ids"])  # once per request in the runner

    def step(model, attention: str = "default", tables: bool = False):
        """`tables`: with this step's row of the request's precomputed modulations
        (runner.precompute), as the service runs Flux."""
        mods = None
        if tables:
            with torch.inference_mode():
                mods = model.modulation_table(inp["t"], inp["guidance"], inp["pooled"], dtype)

        def fn():
            with torch.inference_mode(), attention_precision(attention):
                return model(inp["x"], inp["ctx"], inp["pooled"], inp["t"], rope, inp["guidance"], modulations=mods)
        return fn

    from benchmarks.dit_parallel import kernel_profile  # it imports this module

    graphs = ForwardGraphs(device) if args.cuda_graphs and device.type == "cuda" else None

    def graphed(model, attention: str = "default", tables: bool = False, variant: str = ""):
        """The runner's path: the whole forward as one CUDA graph; `tables`: with this step's row
        of the request's precomputed modulations (runner.precompute), as the service runs Flux."""
        mods = None
        if tables:
            with torch.inference_mode():
                mods = model.modulation_table(inp["t"], inp["guidance"], inp["pooled"], dtype)
        tensors = [inp["x"], inp["ctx"], inp["pooled"], inp["t"], *rope, inp["guidance"], mods]

        def forward(x, ctx, pooled, t, cos, sin, guidance, mods):
            return model(x, ctx, pooled, t, (cos, sin), guidance, modulations=mods)

        def fn():
            with torch.inference_mode(), attention_precision(attention):
                return graphs.run(forward, tensors, depends_on=(id(model), attention, tables, variant))
        return fn

    def table_ms(model, steps: int = 28) -> float:
        """What precomputing a request's modulations costs (once per request, before its steps)."""
        g = inp["guidance"][:1].expand(steps) if inp["guidance"] is not None else None
        t, pooled = inp["t"][:1].expand(steps), inp["pooled"][:1].expand(steps, -1)

        def fn():
            with torch.inference_mode():
                return model.modulation_table(t, g, pooled, dtype)
        return timed(fn, device, 2, 5)[0]

    def run_compiled(name: str, model, *extra, attention: str = "default", variant: str = "", **kw):
        table.run(name, step(model, attention), args.warmup, *extra, **kw)
        table.run(f"{name} + modulation tables", step(model, attention, tables=True), args.warmup, *extra, **kw)
        precomputed.append(f"{name}: {table_ms(model):.2f} ms for 28 steps")
        if args.profile and device.type == "cuda":
            kernel_profile(name, step(model, attention), 0, args.trace_dir, top=args.profile_top)
        if graphs is not None:
            table.run(f"{name} + CUDA graphs", graphed(model, attention, variant=variant), args.warmup, *extra, **kw)
            table.run(f"{name} + CUDA graphs + modulation tables", graphed(model, attention, True, variant),
                      args.warmup, *extra, **kw)
            if args.profile:
                kernel_profile(f"{name} + CUDA graphs + modulation tables", graphed(model, attention, True), 0,
                               args.trace_dir, top=args.profile_top)

    @contextmanager
    def qk_by_inductor():
        """q and k normed and rotated (and quantised) by inductor's kernel after the joined copy,
        instead of qk_norm.py's one-pass kernel: what a sequence-parallel rank runs; for a
        same-process A/B of that kernel."""
        import services.denoiser.models.flux as flux_module

        one_pass, flux_module.attends_alone = flux_module.attends_alone, lambda: False
        try:
            yield
        finally:
            flux_module.attends_alone = one_pass

    precomputed: list[str] = []
    table.run("diffusers eager", diffusers_step, args.warmup)
    table.run("ditserve eager", step(native), args.warmup)
    if not args.no_compile:
        ref.compile_repeated_blocks(fullgraph=True)
        table.run("diffusers compiled", diffusers_step, args.warmup)
        compile_blocks(native)  # the service's own compile path
        run_compiled("ditserve compiled", native)
        if args.qk_ab:
            with qk_by_inductor():
                run_compiled("ditserve compiled, q and k by inductor", native, variant="unfused")
    if not args.no_fp8 and (device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)):
        with torch.device("meta"):
            fp8 = FluxTransformer(cfg)
        fp8.load_state_dict(native.state_dict(), strict=True, assign=True)  # shares the bf16 tensors...
        before = {id(p): p.numel() * p.element_size() for p in fp8.parameters()}
        apply_precision(fp8.eval().requires_grad_(False), "fp8")  # ...then swaps the blocks' for e4m3 copies
        # The bf16 weights it replaced stay on the device for the other rows (a replica drops them).
        # By the fp8 model's own parameter objects: the assigned ones are new Parameters around
        # native's storage, so comparing with native's ids (as this did before) matched nothing.
        after = {id(p) for p in fp8.parameters()}
        replaced = sum(size for i, size in before.items() if i not in after)
        if not args.no_compile:
            compile_blocks(fp8)
        if args.no_compile:
            table.run("ditserve fp8", step(fp8), args.warmup, "fp8", "ditserve eager", not_mine_bytes=replaced)
        else:
            run_compiled("ditserve fp8 compiled", fp8, "fp8", "ditserve compiled", not_mine_bytes=replaced)
            if args.fp8_attention:
                run_compiled("ditserve fp8 + fp8 attention compiled", fp8, "fp8", "ditserve compiled",
                             attention="fp8", not_mine_bytes=replaced)
                with qk_by_inductor():
                    run_compiled("ditserve fp8 + fp8 attention, q and k by inductor, compiled", fp8, "fp8",
                                 "ditserve compiled", attention="fp8", variant="unfused", not_mine_bytes=replaced)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table.print(
        f"\n{args.model} {args.height}x{args.width} ({n_img} image + {args.text_len} text tokens), batch {args.batch}, "
        f"{str(dtype).removeprefix('torch.')}, {name}, torch {torch.__version__}; {table.flops / 1e12:.1f} TFLOP/step; "
        f"weights built in {build_s:.1f}s"
    )
    if precomputed:  # the "+ modulation tables" rows leave this out of their step time
        print("modulation tables, once per request (batch 1): " + "; ".join(precomputed))


def run_offload(args, device: torch.device, dtype: torch.dtype) -> None:
    """ditserve compiled with layerwise offload (each prefetch depth), then resident, one process:
    peak memory is what each configuration itself allocates on the device."""
    from services.denoiser.compile import compile_blocks
    from services.denoiser.offload import enable_layerwise_offload

    cfg_dict = MODELS[args.model]
    cfg = FluxConfig.from_dict(cfg_dict)
    with torch.device("meta"):
        native = FluxTransformer(cfg)
    host = materialise(lambda: FluxTransformer(cfg), device, dtype).cpu()  # the device's RNG is faster
    native.load_state_dict(host.state_dict(), strict=True, assign=True)
    native.eval().requires_grad_(False)
    inp = make_inputs(cfg, args.height, args.width, args.text_len, args.batch, device, dtype)
    table = Table(device, args.iters, step_flops(cfg, inp["x"].shape[1], args.text_len, args.batch),
                  matmul_ceiling(device))
    bandwidth = host_to_device_gib_s(device)
    if not args.no_compile:
        compile_blocks(native)
    with torch.inference_mode():
        rope = native.rope(inp["txt_ids"], inp["img_ids"])

    def step():
        with torch.inference_mode():
            return native(inp["x"], inp["ctx"], inp["pooled"], inp["t"], rope, inp["guidance"])

    for depth in args.prefetch:
        offload = enable_layerwise_offload(native, device, depth)
        table.run(f"ditserve offload prefetch {depth}", step, args.warmup, err_vs="ditserve resident")
        offload.remove()
    native.to(device)
    table.run("ditserve resident", step, args.warmup, err_vs="ditserve resident")
    # offload rows came first; recompute their errors against the resident row now that it exists
    resident = table.outputs["ditserve resident"]
    table.rows = [(n, (r[0], r[1], ((table.outputs[n] - resident).norm() / resident.norm()).item(), *r[3:])
                   if r else None, f) for n, r, f in table.rows]
    layer_gib = max(sum(p.numel() * p.element_size() for p in b.parameters())
                    for b in [*native.transformer_blocks, *native.single_transformer_blocks]) / 2**30
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table.print(
        f"\n{args.model} {args.height}x{args.width}, layerwise offload, {name}, torch {torch.__version__}; "
        f"host->device {bandwidth:.1f} GiB/s measured; largest block {layer_gib:.2f} GiB = "
        f"{layer_gib / bandwidth * 1e3:.1f} ms to copy"
    )
    ms, peak = table.ms["ditserve resident"], next(r[1][1] for r in table.rows if r[0] == "ditserve resident")
    for name, res, _ in table.rows:
        if res is not None and name != "ditserve resident":
            print(f"{name}: {(res[0] / ms - 1) * 100:+.1f}% time per step, peak {res[1] / max(peak, 1) * 100:.0f}% "
                  f"of resident")


if __name__ == "__main__":
    main()
