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
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from services.denoiser.attention import attention
from services.denoiser.models.config import from_config_json
from services.denoiser.parallel.tp import ColumnParallelLinear, RowParallelLinear, TensorParallel

if TYPE_CHECKING:  # block cache
    from services.denoiser.cache import BlockCache

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

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q = norm_q(to_q(x).unflatten(-1, (-1, self.head_dim)))
        k = norm_k(to_k(x).unflatten(-1, (-1, self.head_dim)))
        v = to_v(x).unflatten(-1, (-1, self.head_dim))
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor | None = None):
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:
            cq, ck, cv = self._qkv(
                context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
            )
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v).flatten(2, 3).to(q.dtype)
        if context is None:
            return out
        ctx_out, img_out = out.split_with_sizes([context.shape[1], x.shape[1]], dim=1)
        return self.to_out[0](img_out.contiguous()), self.to_add_out(ctx_out.contiguous())


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
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)

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
        shift, scale, gate = self.norm(temb)
        h = modulate(x, shift, scale)
        mlp = self.proj_mlp.forward_gelu(h, lazy=True)
        out = self.proj_out.forward_pieces([self.attn(h, rope), mlp])
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
    ) -> torch.Tensor:
        """hidden_states [B, N, C_in] packed latents; encoder_hidden_states [B, S, joint_dim];
        pooled_projections [B, P]; timestep and guidance [B] in the pipeline's 0..1 scale.
        `cache` (one per request branch, see services/denoiser/cache.py) may skip middle blocks."""
        img = self.x_embedder(hidden_states)
        timestep = timestep.to(img.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(img.dtype) * 1000
        temb = self.time_text_embed(timestep, guidance, pooled_projections)
        txt = self.context_embedder(encoder_hidden_states)

        # --- block cache (services/denoiser/cache.py) ---
        if cache is not None and cache.enabled:
            # DBCache needs the blocks as one chain on one tensor (one probe residual, one cached
            # residual); the joint [text; image] state is what the single blocks already carry,
            # so it covers both streams of the double blocks too.
            text_len = txt.shape[1]
            x = cache.run(self.block_steps(temb, rope, text_len), torch.cat([txt, img], dim=1))
            scale, shift = self.norm_out(temb)  # the tail below, on the cached path's output
            return self.proj_out(modulate(x[:, text_len:], shift, scale))
        # --- end block cache ---

        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, rope)

        text_len = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        for block in self.single_transformer_blocks:
            x = block(x, temb, rope)
        img = x[:, text_len:]

        # norm_out's chunks are (scale, shift), the reverse of the blocks' (shift, scale).
        scale, shift = self.norm_out(temb)
        return self.proj_out(modulate(img, shift, scale))

    # --- block cache (services/denoiser/cache.py) ---
    def block_steps(self, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], text_len: int):
        """One function per block (double, then single) on the joint state x = [text; image]."""

        def double(block: FluxDoubleBlock):
            def step(x: torch.Tensor) -> torch.Tensor:
                # Contiguous like the uncached path's img/txt: compiled blocks (static strides)
                # reuse their graphs and kernels, so a computed step gives the uncached bits.
                img, txt = block(x[:, text_len:].contiguous(), x[:, :text_len].contiguous(), temb, rope)
                return torch.cat([txt, img], dim=1)

            return step

        def single(block: FluxSingleBlock):
            return lambda x: block(x, temb, rope)

        return [double(b) for b in self.transformer_blocks] + [single(b) for b in self.single_transformer_blocks]

    # --- end block cache ---
