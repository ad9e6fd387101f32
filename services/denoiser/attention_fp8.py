"""fp8 attention (opt-in, `--dit-attention-precision fp8`): cuDNN's fp8 flash attention through
cudnn-frontend (`pip install ditserve[fp8-attention]`), for long sequences, where attention is
most of a step.

One attention, [1, H, S, 128], cuDNN 9.19 + cudnn-frontend 1.32, H200, same call (the kernels
alone; the quantisation below comes on top):
| shape | bf16 (torch SDPA, cuDNN) | fp8 | |
|---|---:|---:|---:|
| Flux 1024x1024, 24 x 4608 | 0.403 ms | 0.283 ms | 1.42x |
| Flux 2048x2048, 24 x 16896 | 5.67 ms | 3.52 ms | 1.61x |
| Wan 2.1 14B 480p 81 frames, 40 x 32760 | 39.2 ms | 26.0 ms | 1.51x |
Its output differs from bf16 attention by ~0.1 (relative, random inputs with peaked softmaxes),
on top of what fp8 linears add: an opt-in, with the error measured in benchmarks/.

Scales are per tensor (cuDNN's fp8 SDPA takes scalar descales) and per sample: one call per batch
entry, so a sample's result never depends on another's values (a mixed batch still equals its
requests run alone). v is quantised from its amax; q and k from a bound the model guarantees
(Flux: its QK-RMSNorm weights, attention.rms_norm_bound), already in e4m3 from qk_norm.py's
kernel on a rank that attends alone, else from their amax. On Hopper cuDNN writes O in fp8
only (bf16 O needs Blackwell); its scale is v's, which cannot overflow, since every output row
is a convex combination of v's rows. The softmax P is quantised with scale 448 (P <= 1).

Off CUDA the same op runs an fp32 emulation with the same quantisation points (q, k, v, P, O), so
the CPU tests exercise this path end to end; it is not cuDNN's arithmetic bit for bit."""

from __future__ import annotations

import math
from functools import cache

import torch

from services.denoiser.quant import FP8, FP8_MAX


def unavailable_reason(device: torch.device, head_dim: int) -> str | None:
    """Why fp8 attention cannot run on `device` for heads of `head_dim` (None: it can), asked
    when a replica starts, so that it refuses to start rather than fail its requests. CPU runs
    the emulation."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"fp8 attention needs CUDA (or the CPU emulation), not {device.type}"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "fp8 attention needs a Hopper or newer GPU (compute capability 9.0)"
    try:
        import cudnn  # noqa: F401
    except Exception as exc:  # ImportError, or a libcudnn the frontend cannot load
        return f"fp8 attention needs cudnn-frontend (pip install 'ditserve[fp8-attention]'): {exc}"
    layout = _bhsd(torch.empty(1, 128, 1, head_dim, device="meta"))
    try:
        _plan(torch.device("cuda", device.index or 0), *[layout] * 4)
    except RuntimeError as exc:
        return str(exc)
    return None


def fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  amax_qk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """softmax(QK^T / sqrt(D)) V over [B, S, H, D] tensors in fp8; returns [B, S, H, D] in v's
    dtype. The quantisation and dequantisation are plain ops, which torch.compile fuses into the
    kernels around them; the attention itself is one opaque op.

    `amax_qk` (attention.attention's): bounds on |q| and |k| that hold for any input. With them q
    and k are scaled statically, an elementwise op that fuses into the kernel producing them (no
    amax pass, no bf16 copy written and read back); without, by each sample's amax. A bound
    wastes range only where values sit well below it: e4m3's relative step is the same from
    2^-6 to 448, so q and k round as finely."""
    if query.dtype == FP8:  # already quantised at their bounds' scale (qk_norm.py)
        (q8, dq), (k8, dk) = ((t, _descales(a, t.shape[0])) for t, a in zip((query, key), amax_qk))
    elif amax_qk is None:
        (q8, dq), (k8, dk) = _quantise(query), _quantise(key)
    else:
        (q8, dq), (k8, dk) = (_quantise_bounded(t, a) for t, a in zip((query, key), amax_qk))
    v8, dv = _quantise(value)
    o8 = torch.ops.ditserve.sdpa_fp8(q8, k8, v8, dq, dk, dv, 1.0 / dv)
    return (o8.float() * dv[:, None, None, None]).to(value.dtype)


def _quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 x [B, S, H, D] with one scale per sample, and its descale [B] (fp32)."""
    amax = x.abs().amax(dim=(1, 2, 3)).float().clamp(min=1e-12)
    return (x.float() * (FP8_MAX / amax)[:, None, None, None]).to(FP8), amax / FP8_MAX


def _quantise_bounded(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 x [B, S, H, D] at the scale of a bound on |x| (0-d), and its descale [B]. The clamp
    keeps a value past a wrong bound finite (a cast past 448 gives NaN in e4m3fn)."""
    amax = amax.float().clamp(min=1e-12)
    x8 = (x.float() * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, _descales(amax, x.shape[0])


def _descales(amax: torch.Tensor, batch: int) -> torch.Tensor:
    """The op's per-sample descales [B] for one bound (0-d) that every sample shares."""
    return (amax.float() / FP8_MAX).reshape(1).expand(batch).contiguous()


@torch.library.custom_op("ditserve::sdpa_fp8", mutates_args=())
def _sdpa_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
              descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor) -> torch.Tensor:
    """e4m3 q, k, v [B, S, H, D] and their per-sample descales [B] -> e4m3 O [B, S, H, D]
    (contiguous) at per-sample scale `scale_o` [B] (v's: 1 / descale_v)."""
    out = torch.empty(q.shape, dtype=FP8, device=q.device)
    if q.device.type != "cuda":
        for b in range(q.shape[0]):
            out[b] = _emulate(q[b], k[b], v[b], descale_q[b], descale_k[b], descale_v[b], scale_o[b])
        return out
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    plan = _plan(q.device, *(_bhsd(t[:1]) for t in (q, k, v, out)))
    for b in range(q.shape[0]):  # one plan, batch 1, its pointers moved along the batch
        plan(*(t[b : b + 1].transpose(1, 2) for t in (q, k, v, out)),
             *(t[b : b + 1].reshape(1, 1, 1, 1) for t in (descale_q, descale_k, descale_v, scale_o)))
    return out


@_sdpa_fp8.register_fake
def _(q, k, v, descale_q, descale_k, descale_v, scale_o):
    return torch.empty(q.shape, dtype=FP8, device=q.device)


def _bhsd(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """cuDNN's [B, H, S, D] dims and strides of a [B, S, H, D] tensor."""
    return tuple(t.transpose(1, 2).shape), tuple(t.transpose(1, 2).stride())


def _emulate(q, k, v, dq, dk, dv, scale_o) -> torch.Tensor:
    """One sample [S, H, D] in fp32 with cuDNN's quantisation points: P rounded to e4m3 at scale
    448 before P @ V (the row sums from unrounded P), O rounded to e4m3 at `scale_o`."""
    q, k, v = (t.float().transpose(0, 1) * d for t, d in ((q, dq), (k, dk), (v, dv)))  # [H, S, D]
    s = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    p8 = (p * FP8_MAX).to(FP8).float() / FP8_MAX
    o = (p8 @ v) / p.sum(dim=-1, keepdim=True)
    return (o * scale_o).to(FP8).transpose(0, 1)


@cache
def _handle(device_index: int):
    import cudnn

    with torch.cuda.device(device_index):
        return cudnn.create_handle()


@cache
def _plan(device: torch.device, q_layout, k_layout, v_layout, o_layout):
    """A built cuDNN graph for these dims and strides, as a function of the batch-1 tensors.
    Built once per shape (at warm-up); a shape cuDNN has no fp8 kernel for fails here, loudly."""
    import cudnn

    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    handle = _handle(device.index)
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    tq, tk, tv = (graph.tensor(name=n, dim=d, stride=s, data_type=e4m3)
                  for n, (d, s) in zip("qkv", (q_layout, k_layout, v_layout)))
    scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
    dq, dk, dv, ds, ss, so = (graph.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so"))
    o, _, amax_s, amax_o = graph.sdpa_fp8(
        q=tq, k=tk, v=tv, descale_q=dq, descale_k=dk, descale_v=dv, descale_s=ds, scale_s=ss, scale_o=so,
        attn_scale=1.0 / math.sqrt(q_layout[0][-1]), use_causal_mask=False, generate_stats=False)
    o.set_output(True).set_dim(o_layout[0]).set_stride(o_layout[1]).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
    try:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
    except Exception as exc:
        raise RuntimeError(f"fp8 attention: cuDNN has no fp8 kernel for q {q_layout[0]} on "
                           f"{torch.cuda.get_device_name(device)}: {str(exc).splitlines()[0]}") from exc
    workspace_size = graph.get_workspace_size()
    ones = torch.ones(4, dtype=torch.float32, device=device)
    scale_s, descale_s = (ones[0:1] * FP8_MAX).reshape(1, 1, 1, 1), (ones[1:2] / FP8_MAX).reshape(1, 1, 1, 1)
    amaxes = torch.empty(2, 1, 1, 1, dtype=torch.float32, device=device)  # cuDNN reports them; unused

    def run(q, k, v, out, descale_q, descale_k, descale_v, scale_o):  # [1, H, S, D]; [1, 1, 1, 1]
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
        workspace = torch.empty(workspace_size, dtype=torch.uint8, device=device)
        graph.execute({tq: q, tk: k, tv: v, dq: descale_q, dk: descale_k, dv: descale_v, ds: descale_s,
                       ss: scale_s, so: scale_o, o: out, amax_s: amaxes[0:1], amax_o: amaxes[1:2]},
                      workspace, handle=handle)

    return run
