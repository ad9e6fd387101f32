"""One attention, bf16 (torch SDPA, cuDNN on Hopper) against ditserve's fp8 op (cuDNN's fp8 flash
kernel through cudnn-frontend, services/denoiser/attention_fp8.py), at Flux and Wan shapes.

    python benchmarks/attention_fp8.py            # on a Hopper GPU with cudnn-frontend

Per shape: the fp8 op alone on already quantised inputs (cuDNN plus its host call), the whole fp8 path
compiled (quantising q, k, v from their amax, the op, dequantising O), and O's relative error
against bf16. Inputs are randn with q and k x2 (logits of std 4: peaked attention). The numbers
in benchmarks/NOTES.md (session 10) were taken with a standalone script building the same cuDNN
graph (same op, same scales) before this one wrapped ditserve's op."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dit_step import timed  # noqa: E402
from services.denoiser.attention_fp8 import _quantise, fp8_attention, unavailable_reason  # noqa: E402

SHAPES = [(4608, 24, "Flux 1024x1024"), (16896, 24, "Flux 2048x2048"), (32760, 40, "Wan 2.1 14B 480p 81 frames")]


def main() -> None:
    device = torch.device("cuda")
    if reason := unavailable_reason(device, 128):
        sys.exit(reason)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("| shape | bf16 SDPA ms | fp8 op ms (quantised inputs) | speed-up | fp8 path compiled ms | rel err vs bf16 |")
    print("|---|---:|---:|---:|---:|---:|")
    compiled = torch.compile(fp8_attention, fullgraph=True, dynamic=False)
    for seq, heads, name in SHAPES:
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(1, seq, heads, 128, generator=g, device=device, dtype=torch.bfloat16) * s
                   for s in (2.0, 2.0, 1.0))
        bhsd = [t.transpose(1, 2) for t in (q, k, v)]
        bf16_ms, _, ref = timed(lambda: F.scaled_dot_product_attention(*bhsd), device, 3, 20)
        quantised = [x for t in (q, k, v) for x in _quantise(t)]
        args = (*quantised[0::2], *quantised[1::2], 1.0 / quantised[5])
        kernel_ms, _, _ = timed(lambda: torch.ops.ditserve.sdpa_fp8(*args), device, 3, 20)
        path_ms, _, out = timed(lambda: compiled(q, k, v), device, 3, 20)
        ref = ref.transpose(1, 2).float()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        print(f"| {name} ({heads} x {seq}) | {bf16_ms:.3f} | {kernel_ms:.3f} | {bf16_ms / kernel_ms:.2f}x | "
              f"{path_ms:.3f} | {err:.3f} |")


if __name__ == "__main__":
    main()
