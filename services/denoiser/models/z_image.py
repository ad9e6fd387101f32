"""Native Z-Image transformer (Z-Image, Z-Image-Turbo), loading diffusers'
`ZImageTransformer2DModel` weights unchanged.

Z-Image is a single-stream DiT. Image tokens first pass the noise refiner (timestep-modulated
blocks over the image tokens alone), caption tokens the context refiner (unmodulated blocks over
the text alone); then one [text; image] sequence runs the main layers. Parameter names are
diffusers', so a checkpoint loads with a strict key match; the arithmetic follows diffusers op
for op (its RMSNorm's casts, fp32 RoPE angles from float64, torch.polar values), so fp32 outputs
agree to rounding. diffusers applies RoPE as a complex product; the real (cos, sin) form here
(flux.apply_rope) rotates the same interleaved pairs with the same products.

Pad tokens. diffusers pads every image and every caption to a multiple of 32 tokens (SEQ_MULTI_OF)
and overwrites the padding with learned tokens (`x_pad_token`, `cap_pad_token`). Its attention
mask hides only the batch padding between samples of different lengths, never these: they are
keys and values in every refiner and main layer, so they change the valid tokens' outputs
(the checkpoints' pad tokens are trained). They are kept here, exactly: inputs come padded
(`pad_tokens`, with `patchify` and the ZImageLatents layout in services/denoiser/latents.py),
`rope()` marks the pad positions, and the model writes its pad tokens there. The caption padding
also moves the image's RoPE positions (they start after the padded caption).

Differences from diffusers are in the interface, because sequence parallelism shards tokens:
forward() takes batched, patchified, padded tokens (every sample the same size and caption
length) and returns per-token outputs; RoPE tables are computed once per request by `rope()`;
the order of the joint sequence is [text; image] (diffusers': [image; text]; attention does not
care, given each token's own RoPE angle). Under sequence parallelism the refiners attend within
their part of the sequence (SequenceParallel.attend_within).

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
from services.denoiser.latents import Z_IMAGE_PATCH as PATCH
from services.denoiser.latents import padded_len
from services.denoiser.models.config import from_config_json
from services.denoiser.models.flux import apply_rope, layer_norm, timestep_embedding
from services.denoiser.parallel.context import SequenceParallel
from services.denoiser.parallel.tp import ColumnParallelLinear, RowParallelLinear, TensorParallel
from services.runtime.errors import UnsupportedModelError

if TYPE_CHECKING:  # block cache
    from services.denoiser.cache import BlockCache

ADALN_EMBED_DIM = 256  # width of the timestep embedding that modulates every block

# ---------------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class ZImageConfig:
    """The fields of diffusers' transformer/config.json that define the architecture.

    `n_kv_heads` is read but not used, as in diffusers: its attention gets no kv-head count, so
    K and V always have n_heads heads (the checkpoints have n_kv_heads == n_heads)."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None  # Z-Image Omni; refused below
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    from_dict = classmethod(from_config_json)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    # What the runner reads of every family: no guidance embedding, no pooled vector, and text
    # embeddings of joint_attention_dim (the caption features).
    guidance_embeds = False
    pooled_projection_dim = 0

    @property
    def joint_attention_dim(self) -> int:
        return self.cap_feat_dim


def rope_tables(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float):
    """cos/sin tables [S, head_dim] (interleaved pairs) for integer positions ids [S, n_axes], in
    diffusers' RopeEmbedder arithmetic: angles in float64, rounded to fp32, then torch.polar."""
    cos_out, sin_out = [], []
    for i, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(ids[:, i].double(), freqs).float()
        rotation = torch.polar(torch.ones_like(angles), angles)
        cos_out.append(rotation.real.repeat_interleave(2, dim=1))
        sin_out.append(rotation.imag.repeat_interleave(2, dim=1))
    return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


class RMSNorm(nn.Module):
    """diffusers' RMSNorm: the mean square in fp32; in bf16/fp16 the normalised x is rounded to
    the weight's dtype before the product (torch's rms_norm rounds once, after it)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding -> mlp.0 -> SiLU -> mlp.2: the AdaLN input of every modulated block."""

    def __init__(self, out_dim: int, mid_dim: int = 1024):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, mid_dim), nn.SiLU(), nn.Linear(mid_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x), no biases; w1 / w3 column-parallel, w2 row-parallel."""

    def __init__(self, dim: int, hidden: int, tp: TensorParallel | None):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden, tp, bias=False)
        self.w2 = RowParallelLinear(hidden, dim, tp, bias=False)
        self.w3 = ColumnParallelLinear(dim, hidden, tp, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ---------------------------------------------------------------------------------------------
# attention


class ZImageAttention(nn.Module):
    """Self-attention with per-head QK-RMSNorm (eps 1e-5 whatever norm_eps says, as diffusers)
    and RoPE. Under tensor parallelism a rank projects and attends its share of the heads."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, tp: TensorParallel | None):
        super().__init__()
        if tp is not None:
            tp.split(heads, "attention heads")  # whole heads per rank
        self.head_dim = dim // heads
        self.to_q = ColumnParallelLinear(dim, dim, tp, bias=False)
        self.to_k = ColumnParallelLinear(dim, dim, tp, bias=False)
        self.to_v = ColumnParallelLinear(dim, dim, tp, bias=False)
        self.norm_q = RMSNorm(self.head_dim, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(self.head_dim, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([RowParallelLinear(dim, dim, tp, bias=False)])

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.to_q(x).unflatten(-1, (-1, self.head_dim))
        k = self.to_k(x).unflatten(-1, (-1, self.head_dim))
        v = self.to_v(x).unflatten(-1, (-1, self.head_dim))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.to_out[0](attention(q, k, v).flatten(2, 3).to(q.dtype))


# ---------------------------------------------------------------------------------------------
# blocks


class ZImageBlock(nn.Module):
    """Pre- and post-RMSNorm around attention and the SwiGLU. With `modulation` (noise refiner,
    main layers) the timestep scales the pre-norms and tanh-gates the branches; there is no shift
    and no SiLU before adaLN_modulation."""

    def __init__(self, config: ZImageConfig, modulation: bool, tp: TensorParallel | None):
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.attention = ZImageAttention(dim, config.n_heads, config.qk_norm, tp)
        self.feed_forward = SwiGLU(dim, int(dim / 3 * 8), tp)
        self.attention_norm1 = RMSNorm(dim, eps)
        self.ffn_norm1 = RMSNorm(dim, eps)
        self.attention_norm2 = RMSNorm(dim, eps)
        self.ffn_norm2 = RMSNorm(dim, eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, ADALN_EMBED_DIM), 4 * dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], adaln: torch.Tensor | None = None):
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        x = x + gate_msa * self.attention_norm2(self.attention(self.attention_norm1(x) * scale_msa, rope))
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


class FinalLayer(nn.Module):
    """Affine-free LayerNorm scaled by 1 + adaLN(SiLU(t)) (no shift), then the output linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_EMBED_DIM), dim))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.adaLN_modulation(adaln)
        return self.linear(layer_norm(x) * scale.unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# model


class ZImageTransformer(nn.Module):
    """Z-Image DiT. forward() takes padded image tokens and caption features and returns the raw
    model output per image token, pad rows included. With `tp`, this rank holds its shard of
    every attention and SwiGLU (whole heads per rank); norms and modulation stay replicated."""

    # The repeated blocks, in execution order (compiled one by one, offloaded layer by layer).
    block_lists = ("noise_refiner", "context_refiner", "layers")

    def __init__(self, config: ZImageConfig, tp: TensorParallel | None = None):
        super().__init__()
        if config.siglip_feat_dim is not None:
            raise UnsupportedModelError("Z-Image Omni (siglip_feat_dim) is not served natively; "
                                        "--backend diffusers serves this checkpoint")
        patches = list(zip(config.all_patch_size, config.all_f_patch_size))
        if PATCH not in patches:
            raise UnsupportedModelError(f"Z-Image transformer without the pipeline's patch {PATCH}: {patches}")
        if config.dim % config.n_heads or sum(config.axes_dims) != config.head_dim:
            raise ValueError(f"axes_dims {config.axes_dims} must sum to dim / n_heads ({config.dim}/{config.n_heads})")
        self.config = config
        dim, c = config.dim, config.in_channels
        # Every patch size of the checkpoint is built (a strict load needs them); forward uses PATCH.
        self.all_x_embedder = nn.ModuleDict({f"{p}-{f}": nn.Linear(f * p * p * c, dim) for p, f in patches})
        self.all_final_layer = nn.ModuleDict({f"{p}-{f}": FinalLayer(dim, p * p * f * c) for p, f in patches})
        self.noise_refiner = nn.ModuleList([ZImageBlock(config, True, tp) for _ in range(config.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([ZImageBlock(config, False, tp) for _ in range(config.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(min(dim, ADALN_EMBED_DIM))
        self.cap_embedder = nn.Sequential(RMSNorm(config.cap_feat_dim, config.norm_eps),
                                          nn.Linear(config.cap_feat_dim, dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.layers = nn.ModuleList([ZImageBlock(config, True, tp) for _ in range(config.n_layers)])

    def rope(self, text_len: int, height: int, width: int, frames: int = 1, device: torch.device | str = "cpu"):
        """(cos, sin, pad) for the padded [text; image] sequence of a request whose captions have
        `text_len` valid tokens and whose latents are (frames,) height x width. Once per request.

        cos / sin [T, head_dim] fp32 and pad [T] bool (True at pad tokens), T = padded_len(text_len)
        + padded_len(image tokens): one row per token, so SequenceParallel.shard_rope shards all
        three. Positions as diffusers': caption token i (pads included) at (1 + i, 0, 0); image
        token (f, h, w) at (padded caption length + 1 + f, h, w); image pads at (0, 0, 0)."""
        p, pf = PATCH
        grid = (frames // pf, height // p, width // p)
        s_pad, n = padded_len(text_len), math.prod(grid)
        text_ids = torch.zeros(s_pad, 3, dtype=torch.long)
        text_ids[:, 0] = torch.arange(1, s_pad + 1)
        image_ids = torch.zeros(padded_len(n), 3, dtype=torch.long)
        axes = torch.meshgrid(*(torch.arange(k) for k in grid), indexing="ij")
        image_ids[:n] = torch.stack(axes, dim=-1).reshape(n, 3) + torch.tensor([s_pad + 1, 0, 0])
        ids = torch.cat([text_ids, image_ids])
        # diffusers looks positions up in tables of axes_lens rows and fails past them.
        if (ids.amax(0) >= torch.tensor(self.config.axes_lens)).any():
            raise ValueError(f"RoPE positions {ids.amax(0).tolist()} exceed axes_lens {self.config.axes_lens} "
                             f"(caption of {text_len} tokens, latent grid {grid})")
        cos, sin = rope_tables(ids, self.config.axes_dims, self.config.rope_theta)
        pad = torch.cat([torch.arange(s_pad) >= text_len, torch.arange(padded_len(n)) >= n])
        return cos.to(device), sin.to(device), pad.to(device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor | None,
        timestep: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        guidance: torch.Tensor | None = None,
        *,
        cache: BlockCache | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, N_pad, 4*C] = pad_tokens(patchify(latents)); encoder_hidden_states
        [B, S_pad, cap_feat_dim] = pad_tokens(caption features), every sample with the same valid
        length; (under sequence parallelism: this rank's shards of both); timestep [B] in the
        pipeline's scale, (1000 - scheduler t) / 1000, i.e. 0 at pure noise; rope: `rope()`'s
        tables (shard_rope'd under sequence parallelism). pooled_projections and guidance are
        unused (the runner's signature; Z-Image has neither).

        Returns [B, N_pad, 4*C], zeros at the pad rows (so a sampler's pad rows stay zero and
        per-image norms count real tokens only); `unpatchify` drops them. Otherwise this is the
        transformer's raw output: ZImagePipeline negates it (noise_pred = -output) before
        scheduler.step; the sampling loop does that (spec.timestep "reversed"), and classifier-free
        guidance."""
        cos, sin, pad = rope
        text_len = encoder_hidden_states.shape[1]
        if text_len + hidden_states.shape[1] != pad.shape[0]:
            raise ValueError(f"{text_len} text + {hidden_states.shape[1]} image tokens, but RoPE tables for "
                             f"{pad.shape[0]}: pass pad_tokens()'d inputs and rope() of the same request")
        key = f"{PATCH[0]}-{PATCH[1]}"
        adaln = self.t_embedder(timestep * self.config.t_scale).type_as(hidden_states)

        img = self.all_x_embedder[key](hidden_states)
        img = torch.where(pad[text_len:, None], self.x_pad_token, img)
        img_rope = (cos[text_len:], sin[text_len:])
        with SequenceParallel.attend_within("image"):
            for block in self.noise_refiner:
                img = block(img, img_rope, adaln)

        txt = self.cap_embedder(encoder_hidden_states)
        txt = torch.where(pad[:text_len, None], self.cap_pad_token, txt)
        txt_rope = (cos[:text_len], sin[:text_len])
        with SequenceParallel.attend_within("text"):
            for block in self.context_refiner:
                txt = block(txt, txt_rope)

        x = torch.cat([txt, img], dim=1)
        if cache is not None and cache.enabled:  # block cache over the main layers (cache.py)
            x = cache.run(self.block_steps(adaln, (cos, sin)), x)
        else:
            for block in self.layers:
                x = block(x, (cos, sin), adaln)
        # The final layer is per token: only the image tokens are worth it.
        out = self.all_final_layer[key](x[:, text_len:], adaln)
        return out.masked_fill(pad[text_len:, None], 0.0)

    # --- block cache (services/denoiser/cache.py) ---
    def block_steps(self, adaln: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """One function per main layer on the joint [text; image] state (the refiners run before)."""
        return [lambda x, block=block: block(x, rope, adaln) for block in self.layers]

    # --- end block cache ---
