"""Native Flux.1 transformer (dev and schnell), loading diffusers' `transformer/` weights unchanged.

Parameter names are diffusers' FluxTransformer2DModel names, so a checkpoint's safetensors load
with a strict key match. The arithmetic follows diffusers op for op (same norms, same order of
residual adds, RoPE in fp32) so that fp32 outputs agree to rounding; what differs is structure:
RoPE tables and the timestep/guidance embedding are inputs computed once per request by the
runner, not recomputed by every forward.

Order (same in every family file): helpers -> attention -> blocks -> top-level model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from services.denoiser.attention import (
    attends_alone,
    attention,
    attention_packed,
    post_packed,
    rms_norm_bound,
    ulysses_packing,
    wants_qk_bounds,
)
from services.denoiser.gelu_fp8 import PendingGelu
from services.denoiser.models.config import from_config_json
from services.denoiser.parallel.tp import ColumnParallelLinear, RowParallelLinear, TensorParallel
from services.denoiser.qk_norm import rms_norm_rope, ulysses_pack

if TYPE_CHECKING:
    from services.denoiser.cache import BlockCache
    from services.denoiser.parallel.ulysses import Posted

# ---------------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class FluxConfig:
    """The fields of diffusers' transformer/config.json that define the architecture."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    from_dict = classmethod(from_config_json)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (diffusers' Timesteps(flip_sin_to_cos=True, shift=0))."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)


def rope_tables(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0):
    """cos/sin tables [S, head_dim] for position ids [S, n_axes], each axis its own frequencies.

    Computed in float64 where the device has it (as diffusers does) and returned as fp32; the
    runner calls this once per request, since ids do not change between steps."""
    freqs_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    pos = ids.float()
    cos_out, sin_out = [], []
    for i, dim in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freqs_dtype, device=ids.device) / dim))
        angles = torch.outer(pos[:, i], freqs)
        cos_out.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_out.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (real, imag) pairs of x [B, S, H, D] by tables [S, D], in fp32."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _joint(parts: list[torch.Tensor]) -> torch.Tensor:
    """[text; image] along the sequence, or the one part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    # Every LayerNorm in Flux is affine-free with eps 1e-6; the modulation supplies scale/shift.
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """temb = MLP(t) [+ MLP(guidance)] + MLP(pooled text); the conditioning of every block."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor):
        emb = self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this Flux checkpoint is guidance-distilled and needs a guidance value")
            emb = emb + self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class AdaLNModulation(nn.Module):
    """SiLU(temb) -> Linear -> `n` chunks of shift/scale/gate vectors [B, dim] (AdaLN-zero)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n, dim=1)


def lora_free(*modules: nn.Module) -> bool:
    """Whether no layer in `modules` carries a per-batch LoRA update (lora/apply.py's unmerged
    `lora_down`): one laid out by the batch's rows, which a modulation table's rows (one sample's
    steps) are not."""
    return all(getattr(m, "lora_down", None) is None for module in modules for m in module.modules())


class Precomputed(NamedTuple):
    """What a block gets in place of temb when the runner precomputed the request's modulations
    (FluxTransformer.modulation_table): the outputs of its AdaLN linears, side by side [B, width]."""

    row: torch.Tensor


def modulations_of(temb: torch.Tensor | Precomputed, *norms: AdaLNModulation) -> list[tuple[torch.Tensor, ...]]:
    """Each of `norms`' chunks, computed from temb [B, dim] or split from a Precomputed row.
    (The widths come from the layers' shapes, the same in every instance of a block, so the
    instances keep sharing one compiled graph.)"""
    if isinstance(temb, Precomputed):
        pieces = temb.row.split([n.linear.out_features for n in norms], dim=1)
        return [p.chunk(n.n, dim=1) for n, p in zip(norms, pieces)]
    return [n(temb) for n in norms]


class FeedForward(nn.Module):
    """GELU(tanh) MLP with diffusers' `net.0.proj` / `net.2` parameter names (column -> row parallel)."""

    def __init__(self, dim: int, hidden: int, tp: TensorParallel | None):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, hidden, tp), nn.Identity(), RowParallelLinear(hidden, dim, tp)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0].proj.forward_gelu(x, lazy=True))


class _GeluProj(nn.Module):
    def __init__(self, dim: int, hidden: int, tp: TensorParallel | None):
        super().__init__()
        self.proj = ColumnParallelLinear(dim, hidden, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj.forward_gelu(x)


# ---------------------------------------------------------------------------------------------
# attention


class FluxAttention(nn.Module):
    """QK-RMSNorm multi-head attention over [text; image] tokens with RoPE.

    Double-stream blocks project text with their own `add_*` weights (context_dim set);
    single-stream blocks see one joint sequence and have no output projection here
    (their proj_out also consumes the MLP branch). Under tensor parallelism a rank projects
    and attends its share of the heads (column-parallel in, row-parallel out)."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, context: bool, eps: float, tp: TensorParallel | None):
        super().__init__()
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = ColumnParallelLinear(dim, inner, tp)
        self.to_k = ColumnParallelLinear(dim, inner, tp)
        self.to_v = ColumnParallelLinear(dim, inner, tp)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        if context:
            self.add_q_proj = ColumnParallelLinear(dim, inner, tp)
            self.add_k_proj = ColumnParallelLinear(dim, inner, tp)
            self.add_v_proj = ColumnParallelLinear(dim, inner, tp)
            self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
            self.to_out = nn.ModuleList([RowParallelLinear(inner, dim, tp)])
            self.to_add_out = RowParallelLinear(inner, dim, tp)

    def _qkv(self, x, to_q, to_k, to_v):
        return (to_q(x).unflatten(-1, (-1, self.head_dim)), to_k(x).unflatten(-1, (-1, self.head_dim)),
                to_v(x).unflatten(-1, (-1, self.head_dim)))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor | None = None):
        return self.end(self.begin(x, rope, context))

    def begin(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor | None = None):
        """forward() up to its q/k/v exchange, started, where one runs as an op (a Ulysses rank in
        a graphed forward): the caller may run work that does not need the attention before
        end() (FluxSingleBlock's MLP GEMM, which a copy-engine exchange runs beside). Elsewhere
        this runs nothing yet and end() runs it all."""
        if not (ranks := ulysses_packing(self.to_q.out_features // self.head_dim)):
            return _Deferred(x, rope, context)
        parts, norms_q, norms_k, amax_qk = self._project(x, context)
        text = parts[0] if context is not None else [p[:, :0] for p in parts[0]]
        # norm and RoPE written straight into the exchange's send buffer (qk_norm.py)
        send = ulysses_pack(*zip(text, parts[-1]), tuple(n.weight for n in (norms_q[0], norms_q[-1])),
                            tuple(n.weight for n in (norms_k[0], norms_k[-1])), *rope, norms_q[0].eps, ranks)
        return _Exchanging(post_packed(send), amax_qk, x, context)

    def end(self, begun, after: torch.Tensor | None = None):
        """The attention output of begin()'s forward. `after`: what the caller computed in between,
        which the compiler must leave there (attention_packed)."""
        if isinstance(begun, _Exchanging):
            out = attention_packed(begun.posted, begun.amax_qk, after).flatten(2, 3)
        else:
            out = self._attend(*begun)
        x, context = begun.x, begun.context
        if context is None:
            return out
        ctx_out, img_out = out.split_with_sizes([context.shape[1], x.shape[1]], dim=1)
        return self.to_out[0](img_out.contiguous()), self.to_add_out(ctx_out.contiguous())

    def _project(self, x, context):
        """q / k / v projections ([text, image] parts, text first), their norms, fp8's q / k bounds."""
        parts = [self._qkv(x, self.to_q, self.to_k, self.to_v)]
        norms_q, norms_k = [self.norm_q], [self.norm_k]
        if context is not None:  # joint attention: the text tokens first, with their own norms
            parts.insert(0, self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj))
            norms_q, norms_k = [self.norm_added_q, self.norm_q], [self.norm_added_k, self.norm_k]
        amax_qk = None
        if wants_qk_bounds():  # fp8 attention: q and k scaled by their norms' bounds (attention.py)
            amax_qk = (rms_norm_bound(*norms_q), rms_norm_bound(*norms_k))
        return parts, norms_q, norms_k, amax_qk

    def _attend(self, x, rope, context) -> torch.Tensor:
        parts, norms_q, norms_k, amax_qk = self._project(x, context)
        cos, sin = rope
        # the one-pass kernel below reads the text's and the image's projections where they are
        text = parts[0] if context is not None else [p[:, :0] for p in parts[0]]
        image, eps = parts[-1], norms_q[0].eps
        if attends_alone() and not torch.is_grad_enabled():
            # norm, RoPE (and fp8's quantisation) in one kernel (qk_norm.py; it has no backward)
            q, k = (rms_norm_rope(text[i], image[i], norms[0].weight, norms[-1].weight, cos, sin, eps,
                                  amax_qk[i] if amax_qk is not None else None)
                    for i, norms in ((0, norms_q), (1, norms_k)))
        else:  # other sequence-parallel forwards: inductor fuses this into the exchange's packing
            q, k = (_joint([n(p[i]) for n, p in zip(norms, parts)]) for i, norms in ((0, norms_q), (1, norms_k)))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = _joint([p[2] for p in parts])
        return attention(q, k, v, amax_qk).flatten(2, 3).to(v.dtype)


class _Deferred(NamedTuple):  # FluxAttention.begin where nothing runs before end
    x: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    context: torch.Tensor | None


class _Exchanging(NamedTuple):  # FluxAttention.begin with the q/k/v exchange under way
    posted: Posted
    amax_qk: tuple[torch.Tensor, torch.Tensor] | None
    x: torch.Tensor
    context: torch.Tensor | None


# ---------------------------------------------------------------------------------------------
# blocks


class FluxDoubleBlock(nn.Module):
    """MMDiT block: text and image streams with separate weights, joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, tp: TensorParallel | None):
        super().__init__()
        self.norm1 = AdaLNModulation(dim, 6)
        self.norm1_context = AdaLNModulation(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, context=True, eps=1e-6, tp=tp)
        self.ff = FeedForward(dim, 4 * dim, tp)
        self.ff_context = FeedForward(dim, 4 * dim, tp)

    def forward(self, img, txt, temb, rope):
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), (
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = modulations_of(
            temb, self.norm1, self.norm1_context)

        img_attn, txt_attn = self.attn(
            modulate(img, shift_msa, scale_msa), rope, context=modulate(txt, c_shift_msa, c_scale_msa)
        )

        img = img + gate_msa.unsqueeze(1) * img_attn
        img = img + gate_mlp.unsqueeze(1) * self.ff(modulate(img, shift_mlp, scale_mlp))

        txt = txt + c_gate_msa.unsqueeze(1) * txt_attn
        txt = txt + c_gate_mlp.unsqueeze(1) * self.ff_context(modulate(txt, c_shift_mlp, c_scale_mlp))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class FluxSingleBlock(nn.Module):
    """One joint stream: attention and MLP in parallel from one modulated input, one proj_out."""

    def __init__(self, dim: int, heads: int, head_dim: int, tp: TensorParallel | None, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = AdaLNModulation(dim, 3)
        self.proj_mlp = ColumnParallelLinear(dim, hidden, tp)
        # Its input is [attention output | MLP hidden], each sharded on its own under TP.
        self.proj_out = RowParallelLinear(dim + hidden, dim, tp, blocks=[dim, hidden])
        self.attn = FluxAttention(dim, heads, head_dim, context=False, eps=1e-6, tp=tp)

    def forward(self, x, temb, rope):
        [(shift, scale, gate)] = modulations_of(temb, self.norm)
        h = modulate(x, shift, scale)
        # The MLP GEMM does not need the attention: where begin() has started the attention's
        # exchange (a graphed Ulysses forward) by copy engine, it runs beside it.
        begun = self.attn.begin(h, rope)
        mlp = self.proj_mlp.forward_gelu(h, lazy=True)
        attn = self.attn.end(begun, after=mlp.pre if isinstance(mlp, PendingGelu) else mlp)
        out = self.proj_out.forward_pieces([attn, mlp])
        x = x + gate.unsqueeze(1) * out
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


# ---------------------------------------------------------------------------------------------
# model


class FluxTransformer(nn.Module):
    """Flux.1 DiT. forward() takes packed image tokens and returns the velocity prediction.
    With `tp`, this rank holds its shard of every attention and MLP (see parallel/tp.py)."""

    # The repeated blocks, in execution order (compiled one by one, offloaded layer by layer).
    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def __init__(self, config: FluxConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        if sum(config.axes_dims_rope) != head_dim:
            raise ValueError(f"axes_dims_rope {config.axes_dims_rope} must sum to attention_head_dim {head_dim}")
        out_channels = config.out_channels or config.in_channels
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxDoubleBlock(dim, heads, head_dim, tp) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleBlock(dim, heads, head_dim, tp) for _ in range(config.num_single_layers)]
        )
        self.norm_out = AdaLNModulation(dim, 2)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * out_channels)

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for the joint [text; image] sequence (once per request)."""
        return rope_tables(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope)

    # --- modulations precomputed per request (runner.py's DenoiserRunner.precompute) ---
    def _modulated(self) -> list[list[AdaLNModulation]]:
        """The AdaLN layers of each block in execution order, then norm_out's."""
        return ([[b.norm1, b.norm1_context] for b in self.transformer_blocks]
                + [[b.norm] for b in self.single_transformer_blocks] + [[self.norm_out]])

    def modulations_tabulable(self) -> bool:
        """Whether modulation_table gives what the forward would: not while a per-batch LoRA
        update is set on a layer the table runs (the embedders or a modulation layer)."""
        return lora_free(self.time_text_embed, *(n.linear for norms in self._modulated() for n in norms))

    @property
    def modulation_width(self) -> int:
        return sum(n.linear.out_features for norms in self._modulated() for n in norms)

    def modulation_table(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
        """Every AdaLN output of T forwards that differ only in their timestep (one sample's
        steps), [T, modulation_width], for forward(modulations=row). Made before the first step,
        it reads each modulation weight once per request rather than once per step: 3.2B of
        Flux.1-dev's 12B parameters, 6.4 GB a step in GEMVs (2.0 ms of the 1024x1024 fp8 step
        on H200). timestep [T] and guidance [T] as forward takes them; pooled [T, P]; `dtype`:
        the hidden states' (forward casts the timestep to it)."""
        timestep = timestep.to(dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(dtype) * 1000
        temb = F.silu(self.time_text_embed(timestep, guidance, pooled))
        return torch.cat([n.linear(temb) for norms in self._modulated() for n in norms], dim=1)

    def _block_modulations(self, row: torch.Tensor) -> list[Precomputed]:
        widths = [sum(n.linear.out_features for n in norms) for norms in self._modulated()]
        return [Precomputed(r) for r in row.split(widths, dim=1)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        guidance: torch.Tensor | None = None,
        *,
        cache: BlockCache | None = None,
        modulations: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, N, C_in] packed latents; encoder_hidden_states [B, S, joint_dim];
        pooled_projections [B, P]; timestep and guidance [B] in the pipeline's 0..1 scale.
        `cache` (one per request branch, see services/denoiser/cache.py) may skip middle blocks.
        `modulations` [B, modulation_width]: this step's rows of modulation_table, which then
        stand in for the timestep, guidance and pooled inputs."""
        img = self.x_embedder(hidden_states)
        if modulations is not None:
            tembs = self._block_modulations(modulations)
        else:
            timestep = timestep.to(img.dtype) * 1000
            if guidance is not None:
                guidance = guidance.to(img.dtype) * 1000
            tembs = [self.time_text_embed(timestep, guidance, pooled_projections)] * len(self._modulated())
        txt = self.context_embedder(encoder_hidden_states)
        # norm_out's chunks are (scale, shift), the reverse of the blocks' (shift, scale).
        [(scale, shift)] = modulations_of(tembs[-1], self.norm_out)

        # --- block cache (services/denoiser/cache.py) ---
        if cache is not None and cache.enabled:
            # DBCache needs the blocks as one chain on one tensor (one probe residual, one cached
            # residual); the joint [text; image] state is what the single blocks already carry,
            # so it covers both streams of the double blocks too.
            text_len = txt.shape[1]
            x = cache.run(self.block_steps(tembs, rope, text_len), torch.cat([txt, img], dim=1))
            return self.proj_out(modulate(x[:, text_len:], shift, scale))  # the tail below
        # --- end block cache ---

        doubles = len(self.transformer_blocks)
        for block, temb in zip(self.transformer_blocks, tembs):
            img, txt = block(img, txt, temb, rope)

        text_len = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        for block, temb in zip(self.single_transformer_blocks, tembs[doubles:]):
            x = block(x, temb, rope)
        img = x[:, text_len:]
        return self.proj_out(modulate(img, shift, scale))

    # --- block cache (services/denoiser/cache.py) ---
    def block_steps(self, tembs: list, rope: tuple[torch.Tensor, torch.Tensor], text_len: int):
        """One function per block (double, then single) on the joint state x = [text; image];
        `tembs`: each block's conditioning (forward's)."""

        def double(block: FluxDoubleBlock, temb):
            def step(x: torch.Tensor) -> torch.Tensor:
                # Contiguous like the uncached path's img/txt: compiled blocks (static strides)
                # reuse their graphs and kernels, so a computed step gives the uncached bits.
                img, txt = block(x[:, text_len:].contiguous(), x[:, :text_len].contiguous(), temb, rope)
                return torch.cat([txt, img], dim=1)

            return step

        def single(block: FluxSingleBlock, temb):
            return lambda x: block(x, temb, rope)

        doubles = len(self.transformer_blocks)
        return ([double(b, t) for b, t in zip(self.transformer_blocks, tembs)]
                + [single(b, t) for b, t in zip(self.single_transformer_blocks, tembs[doubles:])])

    # --- end block cache ---
