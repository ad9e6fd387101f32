"""The single attention entry point of every native model.

Inputs are [B, S, H, D] (sequence-major, as the projections produce them). Outside a parallel
forward this is torch SDPA; inside one (services/denoiser/parallel/context.py) the active
SequenceParallel runs Ulysses / ring attention around the same local kernels below, on the
rank's shard of the sequence. Optional kernels (flash-attn, flashinfer,
sageattention) plug in here so model files never change.

Backend choice: on Hopper the cuDNN kernel runs Flux's attention (24 heads x 4608 tokens x 128,
bf16) in 0.40 ms against 0.79 ms for flash, and torch 2.11 already picks cuDNN by default there
(measured on H200). Forcing the order with `sdpa_kernel(..., set_priority=True)` cost ~12 us a
call in that measurement, so we leave the pick to torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The SequenceParallel of the forward in progress, if any. A plain module global rather than a
# ContextVar: torch.compile(fullgraph=True) cannot trace ContextVar.get, and a denoiser process
# runs one forward at a time (its stage is serialised).
_active_parallel = None


def set_active_parallel(parallel) -> object:
    """Make `parallel` the active one; returns the previous value, for restoring."""
    global _active_parallel
    previous, _active_parallel = _active_parallel, parallel
    return previous


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(D)) V over [B, S, H, D] tensors; returns [B, S, H, D]."""
    if _active_parallel is not None:
        return _active_parallel.attention(query, key, value)
    return local_attention(query, key, value)


def local_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """Attention plus its log-sum-exp, for merging partial results (ring attention).
    Returns out [B, S, H, D] and lse [B, H, S] in fp32."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    elif q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    return out.transpose(1, 2), lse.float()
