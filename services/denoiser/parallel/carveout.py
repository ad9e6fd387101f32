"""GEMMs that leave SMs free for a collective running beside them.

cuBLAS's Hopper GEMMs are persistent: one CTA per SM for the whole kernel. An all-to-all
launched next to one cannot start until the GEMM's CTAs retire, so "overlapped" communication
runs after the GEMM anyway (measured: NCCL began ~40 us before the MLP GEMM's end and ran
slower). With `sms` carved out, the GEMM targets the other SMs (cuBLASLt's SM count target)
and the collective, capped at that many CTAs, runs beside it.

A custom op because the carve-out is global state that must be set around exactly this GEMM,
also inside a compiled graph."""

from __future__ import annotations

import torch


@torch.library.custom_op("ditserve::carved_linear", mutates_args=())
def carved_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool, sms: int) -> torch.Tensor:
    """x W^T + b (then GELU(tanh) if `gelu`) on all SMs but `sms`. Without a bias, a zero one:
    the cuBLASLt bias-epilogue path is the one that honours the SM target, and adding 0 in the
    fp32 epilogue changes nothing."""
    x2 = x.reshape(-1, x.shape[-1])
    if bias is None:
        bias = torch.zeros(weight.shape[0], device=x.device, dtype=x.dtype)
    previous = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(sms)
    try:
        if gelu:
            y = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)
        else:
            y = torch.addmm(bias, x2, weight.t())
    finally:
        torch._C._set_sm_carveout_experimental(previous)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@carved_linear.register_fake
def _(x, weight, bias, gelu, sms):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def can_carve(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Plain half-precision CUDA weights (fp8 GEMMs and CPU keep their own path)."""
    return x.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype
