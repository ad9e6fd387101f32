"""ditserve's own Triton kernels at Flux.1-dev 1024x1024 shapes, swept over their launch shapes,
against inductor's kernel for the same work and a plain copy of the same bytes.

    python benchmarks/kernels.py [qk] [gelu] [gemm] [fuse]   # on a CUDA GPU with Triton (default: all)

- qk_norm.py's QK-RMSNorm + RoPE (bf16 out, and e4m3 for fp8 attention), per call: a single
  block's q (strided inside the fused [4608, 21504] projection) and a double block's (text and
  image q read from their own [512 | 4096, 9216] QKV outputs), over heads / tokens per program
  and warps; inductor's row compiles the eager reference (norm, join, RoPE, quantisation).
- gelu_fp8.py's GELU + row quantisation of the [4608, 12288] MLP hidden state, over warps.
- A double-stream block's text and image GEMMs: two cuBLAS calls against one grouped GEMM.
- The block's GEMMs as the model calls them against fused forms of them (q/k/v as one GEMM,
  the single block's q/k/v + MLP-in as one, proj_out over its two pieces as one, the text's
  GEMMs on a second stream beside the image's), at the 1-GPU and Ulysses-2 row counts.
The copy row moves the kernel's bytes (read + write) with a device-to-device copy: what memory
bandwidth allows. Times are triton.testing.do_bench_cudagraph's."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.denoiser import gelu_fp8, qk_norm  # noqa: E402
from services.denoiser.attention import rms_norm_bound  # noqa: E402
from services.denoiser.models.flux import rope_tables  # noqa: E402


def bench(fn) -> float:
    """us per call, replayed from a CUDA graph: a Python call of a custom op costs more host time
    than these kernels take on the device, so plain timing would measure the host."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=200) * 1000


def copy_us(nbytes: int, device) -> float:
    """A device-to-device copy that reads and writes nbytes in all."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def qk_rows(device) -> None:
    g = torch.Generator(device).manual_seed(0)
    h, d, dim = 24, 128, 3072
    single = torch.randn(1, 4608, dim * 7, generator=g, device=device, dtype=torch.bfloat16)
    txt_qkv = torch.randn(1, 512, dim * 3, generator=g, device=device, dtype=torch.bfloat16)
    img_qkv = torch.randn(1, 4096, dim * 3, generator=g, device=device, dtype=torch.bfloat16)
    norms = [torch.nn.RMSNorm(d, eps=1e-6, device=device, dtype=torch.bfloat16).requires_grad_(False)
             for _ in range(2)]
    ids = torch.stack([torch.zeros(4608), torch.arange(4608) // 64, torch.arange(4608) % 64], dim=1).to(device)
    cos, sin = rope_tables(ids, (16, 56, 56))
    view = lambda t: t[..., :dim].unflatten(-1, (h, d))  # noqa: E731  (q inside the projection's output)
    shapes = {"single block": (view(single)[:, :0], view(single)),
              "double block": (view(txt_qkv), view(img_qkv))}
    reference = torch.compile(qk_norm._reference, fullgraph=True, dynamic=False)
    default = (qk_norm.Launch.heads, qk_norm.Launch.tokens, qk_norm.Launch.warps)
    print("\nQK-RMSNorm + RoPE of q, one call, us (heads x tokens per program, warps)")
    print("| shape | out | inductor | copy of its bytes | " + " | ".join(
        f"{hh}x{tt},w{ww}" for hh, tt, ww in CONFIGS) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(CONFIGS))
    for (name, (text, image)), out in itertools.product(shapes.items(), ("bf16", "fp8")):
        bound = rms_norm_bound(*norms) if out == "fp8" else None
        args = (text, image, norms[0].weight, norms[1].weight, cos, sin, 1e-6, bound)
        nbytes = 4608 * dim * (2 + (1 if out == "fp8" else 2))
        row = [f"{bench(lambda: reference(*args)):.1f}", f"{copy_us(nbytes, device):.1f}"]
        for qk_norm.Launch.heads, qk_norm.Launch.tokens, qk_norm.Launch.warps in CONFIGS:
            # (the sum of squares' order depends on the warps: values may differ by a rounding)
            row.append(f"{bench(lambda: qk_norm.rms_norm_rope(*args)):.1f}")
        qk_norm.Launch.heads, qk_norm.Launch.tokens, qk_norm.Launch.warps = default
        print(f"| {name} | {out} | " + " | ".join(row) + " |")


def gelu_rows(device) -> None:
    g = torch.Generator(device).manual_seed(0)
    y = torch.randn(4608, 12288, generator=g, device=device, dtype=torch.bfloat16)
    reference = torch.compile(lambda y: gelu_fp8.quantize_rows(torch.nn.functional.gelu(y, approximate="tanh")),
                              fullgraph=True, dynamic=False)
    default = gelu_fp8.warps, gelu_fp8.FAST
    row = [f"{bench(lambda: reference(y)):.1f}", f"{copy_us(y.numel() * 3, device):.1f}"]
    expected = gelu_fp8.gelu_quantize_rows(y)[0].float()
    variants = [(fast, w) for fast in (False, True) for w in (8, 16, 32)]
    print("\nGELU + e4m3 row quantisation of [4608, 12288], one call, us (and the share of values that "
          "differ from the default's)")
    print("| inductor | copy of its bytes | " + " | ".join(f"{'fast' if f else 'ieee'} w{w}" for f, w in variants) + " |")
    print("|---:|---:|" + "---:|" * len(variants))
    for gelu_fp8.FAST, w in variants:
        gelu_fp8.warps = lambda block, w=w: w
        differ = (gelu_fp8.gelu_quantize_rows(y)[0].float() != expected).float().mean().item()
        row.append(f"{bench(lambda: gelu_fp8.gelu_quantize_rows(y)):.1f} ({differ:.0e})")
    gelu_fp8.warps, gelu_fp8.FAST = default
    print("| " + " | ".join(row) + " |")


def stream_gemm_rows(device) -> None:
    """A double-stream block's text and image GEMMs (same K, N, their own weights): two cuBLAS
    calls against one grouped GEMM (torch._grouped_mm) over the rows of both. The text's GEMMs
    have few rows (Flux 512, Qwen-Image 128 / 32), which a GEMM alone may not fill the GPU with."""
    import torch.nn.functional as F

    g = torch.Generator(device).manual_seed(0)
    print("\nA double-stream block's text + image GEMMs, bf16, us (TFLOP/s)")
    print("| text rows | image rows | K x N | text alone | image alone | both, two calls | both, one grouped GEMM |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for t_rows, i_rows in ((512, 4096), (128, 4096), (32, 4096)):
        for k, n in ((3072, 3072), (3072, 12288), (12288, 3072)):
            txt = torch.randn(t_rows, k, generator=g, device=device, dtype=torch.bfloat16)
            img = torch.randn(i_rows, k, generator=g, device=device, dtype=torch.bfloat16)
            w_t, w_i = (torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(2))
            both = torch.cat([txt, img])
            stacked = torch.stack([w_t, w_i]).transpose(1, 2)  # [2, K, N], each weight as F.linear reads it
            offs = torch.tensor([t_rows, t_rows + i_rows], device=device, dtype=torch.int32)

            def rate(us, rows):
                return f"{us:.1f} ({2 * rows * k * n / us / 1e6:.0f})"
            cells = [rate(bench(lambda: F.linear(txt, w_t)), t_rows), rate(bench(lambda: F.linear(img, w_i)), i_rows),
                     rate(bench(lambda: (F.linear(txt, w_t), F.linear(img, w_i))), t_rows + i_rows)]
            try:
                grouped = torch._grouped_mm(both, stacked, offs=offs)
                ok = torch.allclose(grouped[:t_rows].float(), F.linear(txt, w_t).float(), rtol=2e-2, atol=2e-2)
                cells.append(rate(bench(lambda: torch._grouped_mm(both, stacked, offs=offs)), t_rows + i_rows)
                             + ("" if ok else " (differs!)"))
            except RuntimeError as exc:
                cells.append(f"failed: {str(exc).splitlines()[0][:60]}")
            print(f"| {t_rows} | {i_rows} | {k} x {n} | " + " | ".join(cells) + " |")


def fusion_rows(device) -> None:
    """Each of a Flux block's GEMM groups as the model runs it (one cuBLAS call per weight)
    against fused forms: what wave quantisation on 132 SMs costs the [rows, 3072] outputs."""
    import torch.nn.functional as F

    g = torch.Generator(device).manual_seed(0)
    dim, hidden = 3072, 12288

    def w(n, k):
        return torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) / k**0.5

    def x(m, k):
        return torch.randn(m, k, generator=g, device=device, dtype=torch.bfloat16)

    wq, wk, wv, wm = w(dim, dim), w(dim, dim), w(dim, dim), w(hidden, dim)
    bias_m = torch.zeros(hidden, device=device, dtype=torch.bfloat16)
    w_qkv, w_all = torch.cat([wq, wk, wv]), torch.cat([wq, wk, wv, wm])
    wo_a, wo_m = w(dim, dim), w(dim, hidden)
    wo = torch.cat([wo_a, wo_m], dim=1)
    side = torch.cuda.Stream(device)

    def beside(main, other):
        def run():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                other()
            main()
            torch.cuda.current_stream().wait_stream(side)
        return run

    print("\nFlux block GEMM groups, bf16, us: as the model runs them -> fused forms")
    print("| rows | group | as run | fused | fused / as run |")
    print("|---:|---|---:|---:|---:|")
    for rows, text_rows in ((4608, 512), (2304, 256)):
        h, a, m = x(rows, dim), x(rows, dim), x(rows, hidden)
        hm = torch.cat([a, m], dim=1)
        t = x(text_rows, dim)
        groups = {
            "q, k, v": (lambda: [F.linear(h, wi) for wi in (wq, wk, wv)], lambda: F.linear(h, w_qkv)),
            "q, k, v, MLP-in (GELU epilogue -> GELU after)": (
                lambda: ([F.linear(h, wi) for wi in (wq, wk, wv)],
                         torch._addmm_activation(bias_m, h, wm.t(), use_gelu=True)),
                lambda: F.gelu(F.linear(h, w_all)[:, 3 * dim:], approximate="tanh")),
            "proj_out: two pieces + add -> one GEMM over [attn | mlp]": (
                lambda: F.linear(a, wo_a) + F.linear(m, wo_m), lambda: F.linear(hm, wo)),
            "proj_out: two pieces + add -> addmm accumulating": (
                lambda: F.linear(a, wo_a) + F.linear(m, wo_m), lambda: torch.addmm(F.linear(a, wo_a), m, wo_m.t())),
            "image q, k, v then text q, k, v -> text on a second stream": (
                lambda: ([F.linear(h[: rows - text_rows], wi) for wi in (wq, wk, wv)],
                         [F.linear(t, wi) for wi in (wq, wk, wv)]),
                beside(lambda: [F.linear(h[: rows - text_rows], wi) for wi in (wq, wk, wv)],
                       lambda: [F.linear(t, wi) for wi in (wq, wk, wv)])),
            "image MLP-in then text MLP-in -> text on a second stream": (
                lambda: (F.linear(h[: rows - text_rows], wm), F.linear(t, wm)),
                beside(lambda: F.linear(h[: rows - text_rows], wm), lambda: F.linear(t, wm))),
        }
        for name, (as_run, fused) in groups.items():
            before, after = bench(as_run), bench(fused)
            print(f"| {rows} | {name} | {before:.1f} | {after:.1f} | {after / before:.3f} |")


CONFIGS = [(hh, tt, ww) for hh in (4, 8) for tt in (1, 2, 4) for ww in (2, 4, 8)]


def main() -> None:
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    parts = sys.argv[1:] or ["qk", "gelu", "gemm", "fuse"]
    with torch.inference_mode():
        if "qk" in parts:
            qk_rows(device)
        if "gelu" in parts:
            gelu_rows(device)
        if "gemm" in parts:
            stream_gemm_rows(device)
        if "fuse" in parts:
            fusion_rows(device)


if __name__ == "__main__":
    main()
