"""Native Qwen-Image transformer (Qwen-Image, Qwen-Image-2512), loading diffusers'
`QwenImageTransformer2DModel` weights unchanged.

Qwen-Image is an MMDiT of double-stream blocks only: the image and text streams have their own
modulation, projections and MLPs and meet in one joint [text; image] attention with QK-RMSNorm.
That attention and the MLP are Flux's (same parameter names, same arithmetic), so they come from
flux.py; what is Qwen's own is below: the RoPE positions (image rows and columns centred on 0,
text placed after the image's largest index on all three axes), the timestep embedding (no
pooled text, no guidance), the `img_mod` / `txt_mod` modulation and the RMS-normed text input.

diffusers applies RoPE as a complex product; the real (cos, sin) form used here rotates the same
interleaved pairs with the same products and sums, from the same fp32 angles and the same
torch.polar values, so fp32 outputs agree to rounding.

Order (same in every family file): helpers -> attention -> blocks -> top-level model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from services.denoiser.models.config import from_config_json
from services.denoiser.models.flux import (
    AdaLNModulation,
    FeedForward,
    FluxAttention,
    MLPEmbedder,
    Precomputed,
    layer_norm,
    lora_free,
    modulate,
    modulations_of,
)
from services.denoiser.parallel.tp import TensorParallel
from services.runtime.errors import UnsupportedModelError

if TYPE_CHECKING:  # block cache
    from services.denoiser.cache import BlockCache

# ---------------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class QwenImageConfig:
    """The fields of diffusers' transformer/config.json that define the architecture."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    # Qwen-Image-Edit-2511: the input images' tokens are modulated as at timestep 0.
    zero_cond_t: bool = False
    # Qwen-Image-Layered's variants; refused below.
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    from_dict = classmethod(from_config_json)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    # What the runner feeds every family: text embeddings of joint_attention_dim, no pooled vector.
    pooled_projection_dim = 0


def timestep_embedding(t: torch.Tensor, dim: int = 256, scale: float = 1000.0) -> torch.Tensor:
    """diffusers' Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000) on the
    pipeline's t / 1000: the 1000 multiplies the angles, after t (in the model dtype) is widened."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    emb = scale * (t[:, None].float() * torch.exp(exponent)[None, :])
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)


def _modulate_tokens(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """flux.modulate with shift / scale already [B, 1 or L, D] (per token under zero_cond_t)."""
    return layer_norm(x) * (1 + scale) + shift


def rope_tables(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int = 10000):
    """cos/sin tables [S, head_dim] for integer positions ids [S, n_axes], in diffusers'
    QwenEmbedRope arithmetic (fp32 angles, torch.polar), expanded to interleaved pairs."""
    cos_out, sin_out = [], []
    for i, dim in enumerate(axes_dim):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=ids.device).to(torch.float32).div(dim))
        rotation = torch.polar(torch.ones(1, device=ids.device), torch.outer(ids[:, i].float(), inv_freq))
        cos_out.append(rotation.real.repeat_interleave(2, dim=1))
        sin_out.append(rotation.imag.repeat_interleave(2, dim=1))
    return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


# ---------------------------------------------------------------------------------------------
# attention: Flux's joint attention (flux.FluxAttention with context), unchanged.


# ---------------------------------------------------------------------------------------------
# blocks


class QwenImageBlock(nn.Module):
    """Double-stream block: per-stream modulation (`img_mod` / `txt_mod`, 6 vectors each),
    joint attention, per-stream GELU MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, tp: TensorParallel | None):
        super().__init__()
        # nn.Sequential(SiLU, Linear) as in diffusers, for the `img_mod.1.weight` names.
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = FluxAttention(dim, heads, head_dim, context=True, eps=1e-6, tp=tp)
        self.img_mlp = FeedForward(dim, 4 * dim, tp)
        self.txt_mlp = FeedForward(dim, 4 * dim, tp)

    def forward(self, img, txt, temb, rope, reference: torch.Tensor | None = None):
        """`reference` (zero_cond_t): per image token [B, L, 1], True on input images' tokens, which
        take the modulation of timestep 0; temb is then [2B, D], timestep t's rows then 0's.
        `temb` may be a Precomputed row instead: img_mod's outputs, then txt_mod's (then, under
        zero_cond_t, img_mod's at timestep 0)."""
        if isinstance(temb, Precomputed):  # this step's row of the request's modulation table
            img_out, txt_out, *zero = temb.row.split(self.img_mod[1].out_features, dim=1)
            if reference is not None:  # zero_cond_t: timestep t's rows, then timestep 0's
                img_out = torch.cat([img_out, *zero], dim=0)
        else:  # (under zero_cond_t the text stream keeps timestep t's rows)
            img_out = self.img_mod(temb)
            txt_out = self.txt_mod(temb.chunk(2, dim=0)[0] if reference is not None else temb)
        if reference is None:
            i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = (
                v.unsqueeze(1) for v in img_out.chunk(6, dim=-1))
        else:  # diffusers' _modulate with modulate_index: torch.where per token
            now, zero = (v.unsqueeze(1) for v in img_out.chunk(2, dim=0))
            i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = (
                torch.where(reference, z, n) for n, z in zip(now.chunk(6, dim=-1), zero.chunk(6, dim=-1)))
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_out.chunk(6, dim=-1)

        img_attn, txt_attn = self.attn(
            _modulate_tokens(img, i_shift1, i_scale1), rope, context=modulate(txt, t_shift1, t_scale1)
        )
        img = img + i_gate1 * img_attn
        txt = txt + t_gate1.unsqueeze(1) * txt_attn

        img = img + i_gate2 * self.img_mlp(_modulate_tokens(img, i_shift2, i_scale2))
        txt = txt + t_gate2.unsqueeze(1) * self.txt_mlp(modulate(txt, t_shift2, t_scale2))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
            img = img.clip(-65504, 65504)
        return img, txt


# ---------------------------------------------------------------------------------------------
# model


class _TimestepEmbedding(nn.Module):
    """diffusers' QwenTimestepProjEmbeddings: `time_text_embed.timestep_embedder.linear_{1,2}`."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(timestep).to(dtype))


class QwenImageTransformer(nn.Module):
    """Qwen-Image DiT. forward() takes packed image tokens and returns the velocity prediction;
    the signature is the runner's for every family (the pooled input is unused: Qwen-Image has
    none). With `tp`, this rank holds its shard of every attention and MLP."""

    block_lists = ("transformer_blocks",)

    def __init__(self, config: QwenImageConfig, tp: TensorParallel | None = None):
        super().__init__()
        unsupported = [f for f in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope")
                       if getattr(config, f)]
        if unsupported:
            raise UnsupportedModelError(f"Qwen-Image transformer option(s) {', '.join(unsupported)} are not served "
                                        "natively; --backend diffusers serves this checkpoint")
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        if sum(config.axes_dims_rope) != head_dim:
            raise ValueError(f"axes_dims_rope {config.axes_dims_rope} must sum to attention_head_dim {head_dim}")
        out_channels = config.out_channels or config.in_channels
        self.time_text_embed = _TimestepEmbedding(dim)
        self.txt_norm = nn.RMSNorm(config.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [QwenImageBlock(dim, heads, head_dim, tp) for _ in range(config.num_layers)]
        )
        self.norm_out = AdaLNModulation(dim, 2)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * out_channels)

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for the joint [text; image] sequence (once per request). `img_ids` are the
        centred (0, row, col) positions of CenteredLatents2x2; `txt_ids` count 0.. and are moved past
        the image's largest row / column index, where diffusers places the text."""
        offset = int(img_ids[:, 1:].max().item()) + 1
        ids = torch.cat([txt_ids + offset, img_ids], dim=0)
        return rope_tables(ids, self.config.axes_dims_rope)

    # --- modulations precomputed per request (runner.py's DenoiserRunner.precompute) ---
    # The modulations depend on the timestep alone (no pooled text, no guidance): one table
    # serves both branches of a true-CFG request.
    modulations_per_prompt = False

    def _modulated(self) -> list[list[tuple[nn.Linear, bool]]]:
        """Each block's modulation linears as its table row holds them, (layer, at timestep 0):
        img_mod, txt_mod and, under zero_cond_t (the input images' tokens modulated as at
        timestep 0), img_mod again at 0; then norm_out's."""
        zero = [True] if self.config.zero_cond_t else []
        blocks = [[(b.img_mod[1], False), (b.txt_mod[1], False)] + [(b.img_mod[1], z) for z in zero]
                  for b in self.transformer_blocks]
        return blocks + [[(self.norm_out.linear, False)]]

    def modulations_tabulable(self) -> bool:
        """As FluxTransformer's: no per-batch LoRA update on a layer the table runs."""
        return lora_free(self.time_text_embed, *(m for layers in self._modulated() for m, _ in layers))

    @property
    def modulation_width(self) -> int:
        return sum(m.out_features for layers in self._modulated() for m, _ in layers)

    def modulation_table(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
        """FluxTransformer.modulation_table for Qwen-Image: [T, modulation_width] for timestep [T]
        (guidance and pooled are unused). 60 blocks x 2 x 56.6M = 6.8B of Qwen-Image's 20B
        parameters are modulation weights, read by every forward (twice a step with true CFG)
        unless tabulated."""
        timestep = timestep.to(dtype)
        temb = F.silu(self.time_text_embed(timestep, dtype))
        zero = F.silu(self.time_text_embed(timestep[:1] * 0, dtype))  # forward's timestep * 0
        return torch.cat([m(zero).expand(len(timestep), -1) if at_zero else m(temb)
                          for layers in self._modulated() for m, at_zero in layers], dim=1)

    def _block_modulations(self, row: torch.Tensor) -> list[Precomputed]:
        """A step's row -> one Precomputed per block (see _modulated), then norm_out's."""
        widths = [sum(m.out_features for m, _ in layers) for layers in self._modulated()]
        return [Precomputed(r) for r in row.split(widths, dim=1)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor | None,
        timestep: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        guidance: torch.Tensor | None = None,
        *,
        cache: BlockCache | None = None,
        reference_tokens: torch.Tensor | None = None,
        modulations: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, N, C_in] packed latents; encoder_hidden_states [B, S, joint_dim] (the
        prompt's valid tokens only: no padding reaches the DiT, see router); timestep [B] in the
        pipeline's 0..1 scale. `reference_tokens`: [N] bool, True on the tokens of input images
        (the runner's, sharded as hidden_states): with zero_cond_t (Qwen-Image-Edit-2511) they
        are modulated as at timestep 0. `modulations` [B, modulation_width]: this step's rows of
        modulation_table, in place of the timestep."""
        img = self.img_in(hidden_states)
        reference = None
        if self.config.zero_cond_t and reference_tokens is not None:
            reference = reference_tokens.view(1, -1, 1)
        if modulations is not None:
            tembs = self._block_modulations(modulations)
        else:
            timestep = timestep.to(img.dtype)
            if reference is not None:
                timestep = torch.cat([timestep, timestep * 0], dim=0)
            temb = self.time_text_embed(timestep, img.dtype)
            # the blocks' inputs, then norm_out's (timestep t's rows alone)
            tembs = [temb] * len(self.transformer_blocks) + [temb.chunk(2, dim=0)[0] if reference is not None else temb]
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        # AdaLayerNormContinuous: (scale, shift)
        [(scale, shift)] = modulations_of(tembs[-1], self.norm_out)

        # --- block cache (services/denoiser/cache.py) ---
        if cache is not None and cache.enabled:
            text_len = txt.shape[1]
            x = cache.run(self.block_steps(tembs, rope, text_len, reference), torch.cat([txt, img], dim=1))
            return self.proj_out(modulate(x[:, text_len:], shift, scale))
        # --- end block cache ---

        for block, temb in zip(self.transformer_blocks, tembs):
            img, txt = block(img, txt, temb, rope, reference)
        return self.proj_out(modulate(img, shift, scale))

    # --- block cache (services/denoiser/cache.py) ---
    def block_steps(self, tembs: list, rope: tuple[torch.Tensor, torch.Tensor], text_len: int,
                    reference: torch.Tensor | None = None):
        """One function per block on the joint state x = [text; image] (as flux.py's double blocks);
        `tembs`: each block's conditioning (forward's)."""

        def step_of(block: QwenImageBlock, temb):
            def step(x: torch.Tensor) -> torch.Tensor:
                img, txt = block(x[:, text_len:].contiguous(), x[:, :text_len].contiguous(), temb, rope, reference)
                return torch.cat([txt, img], dim=1)

            return step

        return [step_of(b, t) for b, t in zip(self.transformer_blocks, tembs)]

    # --- end block cache ---
