"""The single attention entry point of every native model.

Inputs are [B, S, H, D] (sequence-major, as the projections produce them). Outside a parallel
forward this is torch SDPA; inside one (services/denoiser/parallel/context.py) the active
SequenceParallel runs Ulysses / ring attention around the same local kernels below, on the
rank's shard of the sequence. Other kernels plug in here so model files never change: so far
cuDNN's fp8 one (attention_fp8.py, `--dit-attention-precision fp8`); flash-attn, flashinfer and
sageattention are not wired in.

Backend choice: on Hopper the cuDNN kernel runs Flux's attention (24 heads x 4608 tokens x 128,
bf16) in 0.40 ms against 0.79 ms for flash, and torch 2.11 already picks cuDNN by default there
(measured on H200). Forcing the order with `sdpa_kernel(..., set_priority=True)` cost ~12 us a
call in that measurement, so we leave the pick to torch."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

# fp8 attention (attention_fp8.py) in the forward in progress: the runner sets it around each
# forward, as it sets the SequenceParallel, so a process's other models never see it.
_fp8 = False


@contextmanager
def attention_precision(precision: str):
    global _fp8
    previous, _fp8 = _fp8, precision == "fp8"
    try:
        yield
    finally:
        _fp8 = previous


# The SequenceParallel of the forward in progress, if any. A plain module global rather than a
# ContextVar: torch.compile(fullgraph=True) cannot trace ContextVar.get, and a denoiser process
# runs one forward at a time (its stage is serialised). Compiled blocks trace its exchanges (so
# inductor can overlap them with compute) and so guard on the object: one graph per token split.
_active_parallel = None
# An `outside_graphs` SequenceParallel (a model whose text length varies per prompt) is held
# where traced code never reads it: compiled blocks see only the flag and call an opaque op that
# runs it, so a new prompt length (a new token split) does not recompile them.
_outside: list = []
_outside_active = False


def set_active_parallel(parallel) -> object:
    """Make `parallel` the active one; returns the previous value, for restoring."""
    global _active_parallel, _outside_active
    previous = _outside[0] if _outside_active else _active_parallel
    _outside_active = parallel is not None and parallel.outside_graphs
    _active_parallel = None if _outside_active else parallel
    _outside[:] = [parallel] if _outside_active else []
    return previous


@torch.library.custom_op("ditserve::attention_outside_graphs", mutates_args=())
def _outside_graphs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, amax_q: torch.Tensor | None,
                    amax_k: torch.Tensor | None) -> torch.Tensor:
    amax_qk = (amax_q, amax_k) if amax_q is not None else None
    # contiguous, as the fake below says: compiled code reads the result by those strides
    return _outside[0].attention(query, key, value, amax_qk).contiguous()


@_outside_graphs.register_fake
def _(query, key, value, amax_q, amax_k):
    return value.new_empty(query.shape)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              amax_qk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """softmax(QK^T / sqrt(D)) V over [B, S, H, D] tensors; returns [B, S, H, D].

    `amax_qk`: bounds on |query| and |key| (0-d fp32 tensors) that hold for any input, which a
    model passes when wants_qk_bounds() (Flux: from its QK-RMSNorm weights, rms_norm_bound).
    fp8 attention then scales q and k by them rather than by each sample's measured amax, so
    their quantisation is elementwise and fuses into the kernel that normalises and rotates
    them; exact attention ignores them."""
    if _active_parallel is not None:
        return _active_parallel.attention(query, key, value, amax_qk)
    if _outside_active:
        return _outside_graphs(query, key, value, *(amax_qk if amax_qk is not None else (None, None)))
    return local_attention(query, key, value, amax_qk)


def ulysses_packing(heads: int) -> int:
    """n > 1 where the forward in progress exchanges q / k / v of `heads` heads between n Ulysses
    ranks and takes them as one send buffer (post_packed; the model writes it with
    qk_norm.ulysses_pack, which has no backward), else 0."""
    if _active_parallel is None or torch.is_grad_enabled():
        return 0
    return _active_parallel.packs(heads)


def post_packed(send: torch.Tensor):
    """Start the exchange of q / k / v given as a Ulysses send buffer [n, S, B, 3, H / n, D] (see
    ulysses_packing). Work that does not need it may run before attention_packed takes it."""
    return _active_parallel.post_packed(send)


def attention_packed(posted, amax_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
                     after: torch.Tensor | None = None) -> torch.Tensor:
    """attention() of what post_packed sent; returns [B, S, H, D]. `after`: a tensor computed
    between the two calls, which the compiler must then keep there (ulysses.py's finish_packed)."""
    return _active_parallel.attention_packed(posted, amax_qk, after)


def wants_qk_bounds() -> bool:
    """Whether the forward in progress runs fp8 attention, which can use `amax_qk`."""
    return _fp8


def attends_alone() -> bool:
    """Whether attention() runs on this rank alone (no sequence-parallel exchange around it). Then
    it may be handed q and k in e4m3 under fp8 attention (at the scale of `amax_qk`, which must
    come with them); an exchange takes q, k and v in one dtype, so there they stay in the model's."""
    return _active_parallel is None and not _outside_active


def rms_norm_bound(*norms: torch.nn.RMSNorm) -> torch.Tensor:
    """An upper bound on |x| of anything these RMSNorms output, rotated by RoPE or not: a
    normalised vector of width D has sum(x_i^2) <= D, so a (real, imag) pair times the weights
    has norm <= sqrt(D) max|w|, and a rotation keeps a pair's norm. The margin covers the
    roundings after the norm and after RoPE (bf16: 2^-8 relative each)."""
    width = norms[0].normalized_shape[-1]
    peak = torch.stack([n.weight.detach().abs().amax().float() for n in norms]).amax()  # affine norms
    return peak * (width**0.5 * (1 + 2**-6))


def local_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    amax_qk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    if _fp8:  # also inside Ulysses (around this); ring attention stays in the model's dtype
        from services.denoiser.attention_fp8 import fp8_attention

        return fp8_attention(query, key, value, amax_qk)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """Attention plus its log-sum-exp, for merging partial results (ring attention).
    Returns out [B, S, H, D] and lse [B, H, S] in fp32."""
    out, lse = torch.ops.ditserve.attention_lse(*(t.transpose(1, 2) for t in (query, key, value)))
    return out.transpose(1, 2), lse


# One opaque op for torch.compile: the aten kernels that return the log-sum-exp also return
# integers (sequence bounds, RNG state), which dynamo refuses to put in a graph, and the
# kernel choice below asks the device, which it should not trace either.
@torch.library.custom_op("ditserve::attention_lse", mutates_args=())
def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k/v [B, H, S, D] -> out [B, H, S, D] (contiguous), lse [B, H, S] fp32.

    On CUDA in half precision the cuDNN kernel where the card has one (on Hopper it is the
    kernel SDPA itself picks, ~2x faster than flash on Flux's shapes; see the module
    docstring), else flash."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    elif q.dtype in (torch.float16, torch.bfloat16):
        if _cudnn_attention_ok(q.device):
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    return out.contiguous(), lse.reshape(q.shape[:3]).float()  # some kernels give lse [B, H, S, 1]


@_attention_lse.register_fake
def _(q, k, v):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _cudnn_attention_ok(device: torch.device) -> bool:
    return (torch.backends.cudnn.is_available() and torch.backends.cudnn.version() >= 90000
            and torch.cuda.get_device_capability(device) >= (9, 0))
