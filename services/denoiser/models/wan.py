"""Native Wan 2.1 / 2.2 video transformer, loading diffusers' `WanTransformer3DModel` weights unchanged.

One class serves Wan 2.1 (T2V, and I2V with CLIP image embeddings), Wan 2.2 A14B (T2V / I2V:
the high- and low-noise experts are two instances of it) and Wan 2.2 TI2V-5B (per-token
timesteps). Parameter names are diffusers', so a checkpoint's safetensors load with a strict key
match; the arithmetic follows diffusers op for op (fp32 LayerNorms and modulation, the same
casts back to the model dtype, RoPE tables from float64 angles) so fp32 outputs agree to rounding.

What differs is the interface, because sequence parallelism shards tokens: forward() takes video
tokens already patchified (`patchify`) and returns per-token predictions (`unpatchify` makes the
video again), and the RoPE tables are computed once per request by `rope()`. Self-attention goes
through the attention dispatch (Ulysses / ring on token shards); cross-attention to the text and
image tokens, which every rank holds whole, is local: each query attends independently.

Order (same in every family file): helpers -> attention -> blocks -> top-level model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.denoiser.attention import attention, local_attention
from services.denoiser.models.config import from_config_json
from services.denoiser.models.flux import FeedForward, MLPEmbedder, timestep_embedding
from services.denoiser.parallel.tp import (
    AcrossHeadsRMSNorm,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
)
from services.runtime.errors import UnsupportedModelError

# ---------------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class WanConfig:
    """The fields of diffusers' transformer/config.json that define the architecture.

    `qk_norm` is absent on purpose: diffusers' WanAttention always builds an RMSNorm over all
    heads, whatever the config says. `image_dim` / `added_kv_proj_dim` are set together on
    Wan 2.1 I2V (CLIP image tokens); `pos_embed_seq_len` on its first-last-frame variant."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    from_dict = classmethod(from_config_json)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    # What the runner reads of every family: the text width, no pooled vector, no guidance embedding.
    @property
    def joint_attention_dim(self) -> int:
        return self.text_dim

    pooled_projection_dim = 0
    guidance_embeds = False


def patchify(latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, F, H, W] -> tokens [B, f*h*w, pt*ph*pw*C]: tokens in (f, h, w) order as diffusers'
    Conv3d output flattens, features in (pt, ph, pw, C) order: the order of proj_out's features
    (`unpatchify`), so the sampler's state tokens and the DiT's prediction line up feature for
    feature (the patch embedding reorders its weight to match)."""
    b, c, f, h, w = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(tokens: torch.Tensor, frames: int, height: int, width: int, patch: tuple[int, int, int],
               out_channels: int) -> torch.Tensor:
    """Per-token predictions [B, N, pt*ph*pw*C_out] -> [B, C_out, F, H, W] (latent sizes), with
    diffusers' reshape / permute (proj_out's features are (pt, ph, pw, C_out))."""
    pt, ph, pw = patch
    f, h, w = frames // pt, height // ph, width // pw
    x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, out_channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def rope_tables(grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0):
    """cos/sin [f*h*w, head_dim/2] for the tokens of a (f, h, w) grid, in token order: each
    rotated pair's angle, the head dim split into (t, h, w) axes as diffusers' WanRotaryPosEmbed.

    diffusers keeps pair-interleaved [.., head_dim] tables and reads every other column; the
    half-width tables here are exactly those columns. Angles in float64 where the device has
    it (diffusers builds them on the host in float64), returned as fp32."""
    h_dim = w_dim = 2 * (head_dim // 6)
    axes = (head_dim - h_dim - w_dim, h_dim, w_dim)
    freqs_dtype = torch.float32 if device.type == "mps" else torch.float64
    f, h, w = grid
    cos_out, sin_out = [], []
    for axis, (dim, n) in enumerate(zip(axes, grid)):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freqs_dtype, device=device) / dim))
        angles = torch.outer(torch.arange(n, device=device), freqs)
        shape = [1, 1, 1, -1]
        shape[axis] = n
        cos_out.append(angles.cos().float().view(shape).expand(f, h, w, -1))
        sin_out.append(angles.sin().float().view(shape).expand(f, h, w, -1))
    return torch.cat(cos_out, dim=-1).reshape(f * h * w, -1), torch.cat(sin_out, dim=-1).reshape(f * h * w, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, D] by half-width tables [S, D/2]. The products
    run in fp32 (the tables are fp32) and round once to x's dtype, as diffusers'."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (diffusers' FP32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class TextProjection(nn.Module):
    """linear_1 -> GELU(tanh) -> linear_2 (diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class _ExactGeluProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class _ImageFeedForward(nn.Module):
    """diffusers' FeedForward(mult=1, activation "gelu"): `net.0.proj` / `net.2` names."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(_ExactGeluProj(dim, dim), nn.Identity(), nn.Linear(dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> the image K/V input of Wan 2.1 I2V (replicated: 257 tokens a request).
    With `pos_embed` (first-last-frame), consecutive batch rows are the two frames' tokens and
    join into one sequence, as diffusers' view() does."""

    def __init__(self, in_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_dim)
        self.ff = _ImageFeedForward(in_dim, dim)
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_dim)) if pos_embed_seq_len else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x.view(-1, 2 * x.shape[1], x.shape[2]) + self.pos_embed
        return self.norm2(self.ff(self.norm1(x)))


class ConditionEmbedding(nn.Module):
    """Timestep -> temb [B, n, D] and the blocks' modulation [B, n, 6, D]; text (and image)
    embeddings -> the model width. n is 1, or the token count for per-token timesteps."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.inner_dim
        self.freq_dim = config.freq_dim
        self.time_embedder = MLPEmbedder(config.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(config.text_dim, dim)
        self.image_embedder = (
            ImageEmbedding(config.image_dim, dim, config.pos_embed_seq_len) if config.image_dim is not None else None
        )

    def forward(self, timestep: torch.Tensor, text_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [B, n] in the scheduler's 0..1000 scale (Wan does not rescale it)."""
        b, n = timestep.shape
        emb = timestep_embedding(timestep.flatten(), self.freq_dim).unflatten(0, (b, n))
        # diffusers runs the time MLP in its own weights' dtype (fp32 when loaded with
        # _keep_in_fp32_modules), then casts temb to the text's dtype.
        temb = self.time_embedder(emb.to(self.time_embedder.linear_1.weight.dtype)).to(text_dtype)
        return temb, self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))


# ---------------------------------------------------------------------------------------------
# attention


class WanAttention(nn.Module):
    """Multi-head attention with QK-RMSNorm across heads. Self-attention (RoPE, through the
    dispatch: on token shards under sequence parallelism) or cross-attention to whole text /
    image tokens (local, no communication). Under tensor parallelism a rank projects and attends
    its share of whole heads (column-parallel in, row-parallel out)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, tp: TensorParallel | None,
                 image_kv_dim: int | None = None):
        super().__init__()
        if tp is not None and heads % tp.size:
            raise ValueError(f"tensor parallelism {tp.size} does not divide the {heads} attention heads")
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = ColumnParallelLinear(dim, inner, tp)
        self.to_k = ColumnParallelLinear(dim, inner, tp)
        self.to_v = ColumnParallelLinear(dim, inner, tp)
        self.to_out = nn.ModuleList([RowParallelLinear(inner, dim, tp)])
        self.norm_q = AcrossHeadsRMSNorm(inner, eps, tp)
        self.norm_k = AcrossHeadsRMSNorm(inner, eps, tp)
        if image_kv_dim is not None:  # Wan 2.1 I2V: a second K/V from the CLIP image tokens
            self.add_k_proj = ColumnParallelLinear(image_kv_dim, inner, tp)
            self.add_v_proj = ColumnParallelLinear(image_kv_dim, inner, tp)
            self.norm_added_k = AcrossHeadsRMSNorm(inner, eps, tp)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(x)))
        v = self._heads(self.to_v(x))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v).flatten(2, 3).type_as(q)
        return self.to_out[0](out)

    def cross(self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(text)))
        v = self._heads(self.to_v(text))
        out = local_attention(q, k, v).flatten(2, 3).type_as(q)
        if image is not None:
            k_img = self._heads(self.norm_added_k(self.add_k_proj(image)))
            v_img = self._heads(self.add_v_proj(image))
            out = out + local_attention(q, k_img, v_img).flatten(2, 3).type_as(q)
        return self.to_out[0](out)


# ---------------------------------------------------------------------------------------------
# blocks


class WanBlock(nn.Module):
    """Self-attention, cross-attention, MLP. Modulation comes from the shared timestep projection
    plus this block's `scale_shift_table`; the residual stream is updated in fp32 and cast back
    after each branch, as diffusers does."""

    def __init__(self, config: WanConfig, tp: TensorParallel | None):
        super().__init__()
        dim, heads, head_dim, eps = config.inner_dim, config.num_attention_heads, config.attention_head_dim, config.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, head_dim, eps, tp)
        self.attn2 = WanAttention(dim, heads, head_dim, eps, tp, image_kv_dim=config.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, config.ffn_dim, tp)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, text, image, modulation, rope):
        """modulation [B, n, 6, D] (n = 1 or per token); text / image whole, x maybe a shard."""
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (
            self.scale_shift_table + modulation.float()
        ).unbind(2)

        h = (self.norm1(x.float()) * (1 + scale_msa) + shift_msa).type_as(x)
        x = (x.float() + self.attn1(h, rope) * gate_msa).type_as(x)

        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2.cross(h, text, image)

        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


# ---------------------------------------------------------------------------------------------
# model


class WanTransformer(nn.Module):
    """Wan DiT. forward() takes patchified video tokens and returns the per-token flow
    prediction. With `tp`, this rank holds its shard of every attention and MLP."""

    # The repeated blocks, in execution order (compiled one by one, offloaded layer by layer).
    block_lists = ("blocks",)

    def __init__(self, config: WanConfig, tp: TensorParallel | None = None):
        super().__init__()
        if (config.image_dim is None) != (config.added_kv_proj_dim is None):
            raise UnsupportedModelError(
                f"Wan transformer with image_dim={config.image_dim} but added_kv_proj_dim="
                f"{config.added_kv_proj_dim}: image conditioning needs both (Wan 2.1 I2V) or neither"
            )
        self.config = config
        dim = config.inner_dim
        out_channels = config.out_channels or config.in_channels
        # Kept Conv3d-shaped for the checkpoint's names and shapes; applied as a linear on the
        # patchified tokens (a stride = kernel convolution is exactly that), so shards work.
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.condition_embedder = ConditionEmbedding(config)
        self.blocks = nn.ModuleList([WanBlock(config, tp) for _ in range(config.num_layers)])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def rope(self, frames: int, height: int, width: int, device: torch.device | str = "cpu"):
        """RoPE (cos, sin) tables [N, head_dim/2] for the tokens of a latent video of these sizes
        (latent frames, height, width, as patchify takes them), in token order. Once per request."""
        pt, ph, pw = self.config.patch_size
        grid = (frames // pt, height // ph, width // pw)
        if max(grid) > self.config.rope_max_seq_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len {self.config.rope_max_seq_len}")
        return rope_tables(grid, self.config.attention_head_dim, torch.device(device))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor | None,
        timestep: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        guidance: torch.Tensor | None = None,
        *,
        cache=None,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The runner's signature for every family (Wan has no pooled text and no guidance
        embedding; the block cache is not implemented for Wan, so `cache` must be None).
        hidden_states [B, N, pt*ph*pw*C_in] (`patchify`, maybe this rank's token shard);
        encoder_hidden_states [B, S, text_dim] (whole); timestep [B], or [B, N] per token
        (Wan 2.2 TI2V's expand_timesteps; the same shard as the tokens), in the scheduler's
        0..1000 scale; rope: `rope()`'s tables for these tokens; encoder_hidden_states_image
        [B, 257, image_dim] CLIP tokens for Wan 2.1 I2V checkpoints. Returns [B, N, pt*ph*pw*C_out]."""
        if cache is not None:
            raise ValueError("the block cache is not implemented for Wan")
        image_cond = self.condition_embedder.image_embedder is not None
        if image_cond != (encoder_hidden_states_image is not None):
            raise ValueError("this Wan checkpoint " + ("needs CLIP image embeddings (I2V)" if image_cond
                             else "has no image cross-attention; do not pass image embeddings"))
        # Conv3d weight [dim, C, pt, ph, pw] -> [dim, pt*ph*pw*C], patchify's feature order.
        weight = self.patch_embedding.weight.permute(0, 2, 3, 4, 1)
        x = F.linear(hidden_states, weight.flatten(1), self.patch_embedding.bias)

        if timestep.ndim == 1:
            timestep = timestep[:, None]
        elif timestep.shape[1] != x.shape[1]:
            raise ValueError(f"per-token timesteps {tuple(timestep.shape)} for {x.shape[1]} tokens")
        temb, modulation = self.condition_embedder(timestep, encoder_hidden_states.dtype)
        text = self.condition_embedder.text_embedder(encoder_hidden_states)
        image = self.condition_embedder.image_embedder(encoder_hidden_states_image) if image_cond else None

        for block in self.blocks:
            x = block(x, text, image, modulation, rope)

        # Note diffusers adds temb here without widening it to fp32 (unlike in the blocks).
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)
