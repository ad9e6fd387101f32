"""Native Flux.2 transformer ([dev] and [klein]), loading diffusers' `Flux2Transformer2DModel`
weights unchanged.

Flux.2 keeps Flux.1's shape (double-stream MMDiT blocks, then single-stream blocks on the joint
[text; image] sequence) and changes most of the parts:
  - no biases anywhere, and no pooled text vector: the conditioning vector is the timestep
    embedding (+ the guidance embedding for [dev]; [klein] has none);
  - modulation is shared: one linear per stream for all double blocks and one for all single
    blocks (`double_stream_modulation_img/_txt`, `single_stream_modulation`), computed once per
    forward here as in diffusers, instead of one AdaLN linear per block;
  - SwiGLU MLPs (ratio 3) with fused [gate | up] input projections;
  - single blocks fuse the QKV and MLP-in projections into one linear (`to_qkv_mlp_proj`,
    [q | k | v | gate | up]) and the attention-out and MLP-out into another (`to_out`);
  - RoPE over 4 position axes (t, row, col, text index) with theta 2000.

Fused linears keep diffusers' layout and shard by pieces under tensor parallelism: column-parallel
with `blocks=` (services/runtime/tensor_parallel.py), so a rank's output is [q_r | k_r | v_r |
gate_r | up_r] and splits the way the whole output does; the single blocks' `to_out` is
row-parallel over [attention | MLP] (`blocks=`), as flux.py's single-block proj_out.

The arithmetic follows diffusers op for op (same norms and casts, same order of residual adds,
RoPE in fp32), so fp32 outputs agree to rounding. The one structural difference, as in flux.py:
`to_out` of a single block runs one GEMM per input piece (forward_pieces) instead of one on the
[tokens, 4 x dim] concatenation. That rounds twice in bf16: on the tiny test model the bf16 output
is 5e-3 (relative) from diffusers' with pieces and bitwise equal with a concatenation; fp32 agrees
to 2e-7 either way.

What the pipelines (diffusers' Flux2Pipeline / Flux2KleinPipeline) do around the transformer, and
the helpers below that mirror it:
  - latents: noise is drawn directly in the patchified shape [B, in_channels, H', W'] (H' = height
    // (vae_scale_factor * 2), in_channels = 4 x the VAE's latent channels) and `pack`ed to
    [B, H'W', in_channels] (a reshape, row-major tokens). After the loop: `unpack`, undo the VAE's
    batch-norm statistics per patchified channel (x * sqrt(bn.running_var + batch_norm_eps) +
    bn.running_mean), unpatchify to [B, C, 2H', 2W'] and decode (no scaling / shift factor): the
    VAE worker's part (services/vae/stage.py).
    Per token this is Flux.1's 2x2 packing of the VAE latent; what differs is the noise's shape
    (so a seed's draw) and that the normalisation happens on patchified channels.
  - position ids: `image_ids` (0, row, col, 0) and `text_ids` (0, 0, 0, index); reference images
    (editing) are more image tokens appended after the noise tokens with t = 10, 20, ...,
    and only the first N outputs are the prediction.
  - timestep: the scheduler's t / 1000 (the model multiplies by 1000); guidance ([dev] only): the
    guidance scale itself (e.g. 4.0, also multiplied by 1000 inside).
  - text: every one of the max_sequence_length (512) padded prompt tokens reaches the DiT (the
    mask is used only inside the text encoder); per token, hidden states of three text-encoder
    layers concatenated ([klein]: Qwen3 layers 9, 18, 27; [dev]: Mistral-3 layers 10, 20, 30).

Order (same in every family file): helpers -> attention -> blocks -> top-level model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from services.denoiser.attention import attention
from services.denoiser.models.config import from_config_json
from services.denoiser.models.flux import apply_rope, rope_tables, timestep_embedding
from services.denoiser.parallel.tp import ColumnParallelLinear, RowParallelLinear, TensorParallel

if TYPE_CHECKING:  # block cache
    from services.denoiser.cache import BlockCache

# ---------------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class Flux2Config:
    """The fields of diffusers' transformer/config.json that define the architecture."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: int = 2000
    eps: float = 1e-6
    guidance_embeds: bool = True

    from_dict = classmethod(from_config_json)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    # What the runner feeds every family: text embeddings of joint_attention_dim, no pooled vector.
    pooled_projection_dim = 0


def image_ids(h: int, w: int, device: torch.device, t: int = 0) -> torch.Tensor:
    """Position ids [(h/2)(w/2), 4] = (t, row, col, 0) of an h x w VAE latent's tokens, rows
    first: the pipeline's _prepare_latent_ids (t = 0) on the patchified [B, 4C, h/2, w/2] latent,
    or _prepare_image_ids for the i-th reference image (t = 10 + 10 i). int64, as the pipeline's."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h // 2), torch.arange(w // 2),
                                torch.arange(1)).to(device)


def text_ids(seq_len: int, device: torch.device) -> torch.Tensor:
    """Position ids [seq_len, 4] = (0, 0, 0, index): the pipeline's _prepare_text_ids."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(seq_len)).to(device)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """VAE latent [B, C, h, w] -> [B, 4C, h/2, w/2], channel c*4 + 2*dy + dx (_patchify_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Patchified [B, 4C, h', w'] -> tokens [B, h'w', 4C], rows first (_pack_latents)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens [B, h'w', 4C] of the h' x w' grid (`image_ids` order) -> [B, 4C, h', w']: what the
    pipeline's _unpack_latents_with_ids scatters for those ids."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Every LayerNorm in Flux.2 is affine-free; the modulation supplies scale and shift.
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LN(x) (1 + scale) + shift, with shift / scale [B, 1, dim] (Flux2Modulation.split's shape)."""
    return layer_norm(x, eps) * (1 + scale) + shift


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up on x = [gate | up] (a rank's local halves under TP, see SwiGLUFeedForward)."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


class TimestepEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 without biases (diffusers' TimestepEmbedding(sample_proj_bias=False))."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepGuidanceEmbedding(nn.Module):
    """temb = MLP(t) [+ MLP(guidance)]: the one conditioning vector (no pooled text in Flux.2)."""

    def __init__(self, channels: int, dim: int, guidance: bool):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedder(channels, dim)
        self.guidance_embedder = TimestepEmbedder(channels, dim) if guidance else None

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        # The sinusoids are fp32; they are cast to the (model-dtype) timestep's dtype, as diffusers does.
        emb = self.timestep_embedder(timestep_embedding(timestep, self.channels).to(timestep.dtype))
        if self.guidance_embedder is None:
            return emb  # [klein]: a guidance value, if given, is ignored (diffusers ignores it too)
        if guidance is None:
            raise ValueError("this Flux.2 checkpoint is guidance-distilled and needs a guidance value")
        return emb + self.guidance_embedder(timestep_embedding(guidance, self.channels).to(guidance.dtype))


class Modulation(nn.Module):
    """SiLU(temb) -> Linear -> `sets` x (shift, scale, gate), each [B, 1, dim]. One of these
    serves every block of its kind (diffusers' Flux2Modulation, split as its `split` does)."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).unsqueeze(1).chunk(3 * self.sets, dim=-1)


class OutputNorm(nn.Module):
    """diffusers' AdaLayerNormContinuous(elementwise_affine=False, bias=False): chunks are
    (scale, shift), the reverse of the blocks' (shift, scale)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return layer_norm(x, self.eps) * (1 + scale)[:, None, :] + shift[:, None, :]


class SwiGLUFeedForward(nn.Module):
    """linear_in -> SwiGLU -> linear_out (diffusers' Flux2FeedForward). linear_in's output is
    [gate | up], sharded as two blocks under TP so that a rank's halves pair up."""

    def __init__(self, dim: int, hidden: int, tp: TensorParallel | None):
        super().__init__()
        self.linear_in = ColumnParallelLinear(dim, 2 * hidden, tp, bias=False, blocks=[hidden, hidden])
        self.linear_out = RowParallelLinear(hidden, dim, tp, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(swiglu(self.linear_in(x)))


# ---------------------------------------------------------------------------------------------
# attention


class Flux2Attention(nn.Module):
    """Double-stream joint attention over [text; image] with QK-RMSNorm and RoPE: text projected
    by the `add_*` weights. Same as flux.FluxAttention with context, without biases. Under TP a
    rank projects and attends its share of the heads (column-parallel in, row-parallel out)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, tp: TensorParallel | None):
        super().__init__()
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = ColumnParallelLinear(dim, inner, tp, bias=False)
        self.to_k = ColumnParallelLinear(dim, inner, tp, bias=False)
        self.to_v = ColumnParallelLinear(dim, inner, tp, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([RowParallelLinear(inner, dim, tp, bias=False)])  # `to_out.0` (1 is dropout)
        self.add_q_proj = ColumnParallelLinear(dim, inner, tp, bias=False)
        self.add_k_proj = ColumnParallelLinear(dim, inner, tp, bias=False)
        self.add_v_proj = ColumnParallelLinear(dim, inner, tp, bias=False)
        self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_add_out = RowParallelLinear(inner, dim, tp, bias=False)

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q = norm_q(to_q(x).unflatten(-1, (-1, self.head_dim)))
        k = norm_k(to_k(x).unflatten(-1, (-1, self.head_dim)))
        v = to_v(x).unflatten(-1, (-1, self.head_dim))
        return q, k, v

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        q, k, v = self._qkv(img, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        cq, ck, cv = self._qkv(txt, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                               self.norm_added_k)
        q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v).flatten(2, 3).to(q.dtype)
        txt_out, img_out = out.split_with_sizes([txt.shape[1], img.shape[1]], dim=1)
        return self.to_out[0](img_out.contiguous()), self.to_add_out(txt_out.contiguous())


class Flux2ParallelSelfAttention(nn.Module):
    """A single block's attention and SwiGLU MLP side by side (ViT-22B's "parallel" block), with
    diffusers' fused parameters: `to_qkv_mlp_proj` = [q | k | v | gate | up] in, `to_out` =
    [attention | MLP hidden] out. Returns the block's update (before the gate)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float, tp: TensorParallel | None):
        super().__init__()
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_qkv_mlp_proj = ColumnParallelLinear(dim, 3 * inner + 2 * mlp_hidden, tp, bias=False,
                                                    blocks=[inner] * 3 + [mlp_hidden] * 2)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = RowParallelLinear(inner + mlp_hidden, dim, tp, bias=False, blocks=[inner, mlp_hidden])
        # This rank's widths of the QKV and MLP parts of the fused output.
        n = tp.size if tp is not None else 1
        self.split_sizes = [3 * inner // n, 2 * mlp_hidden // n]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv, mlp = self.to_qkv_mlp_proj(x).split(self.split_sizes, dim=-1)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in qkv.chunk(3, dim=-1))
        q, k = self.norm_q(q), self.norm_k(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v).flatten(2, 3).to(q.dtype)
        return self.to_out.forward_pieces([out, swiglu(mlp)])


# ---------------------------------------------------------------------------------------------
# blocks


class Flux2DoubleBlock(nn.Module):
    """MMDiT block: text and image streams with their own weights, joint attention. Modulation
    comes in (shared by all double blocks); the norms have no parameters."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float, tp: TensorParallel | None):
        super().__init__()
        self.eps = eps
        self.attn = Flux2Attention(dim, heads, head_dim, eps, tp)
        self.ff = SwiGLUFeedForward(dim, mlp_hidden, tp)
        self.ff_context = SwiGLUFeedForward(dim, mlp_hidden, tp)

    def forward(self, img, txt, img_mod, txt_mod, rope):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = img_mod
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = txt_mod

        img_attn, txt_attn = self.attn(modulate(img, shift_msa, scale_msa, self.eps),
                                       modulate(txt, c_shift_msa, c_scale_msa, self.eps), rope)

        img = img + gate_msa * img_attn
        img = img + gate_mlp * self.ff(modulate(img, shift_mlp, scale_mlp, self.eps))

        txt = txt + c_gate_msa * txt_attn
        txt = txt + c_gate_mlp * self.ff_context(modulate(txt, c_shift_mlp, c_scale_mlp, self.eps))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class Flux2SingleBlock(nn.Module):
    """One joint stream: attention and MLP in parallel from one modulated input (modulation
    shared by all single blocks)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float, tp: TensorParallel | None):
        super().__init__()
        self.eps = eps
        self.attn = Flux2ParallelSelfAttention(dim, heads, head_dim, mlp_hidden, eps, tp)

    def forward(self, x, mod, rope):
        shift, scale, gate = mod
        x = x + gate * self.attn(modulate(x, shift, scale, self.eps), rope)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


# ---------------------------------------------------------------------------------------------
# model


class Flux2Transformer(nn.Module):
    """Flux.2 DiT. forward() takes packed image tokens and returns the velocity prediction, one
    row per input token; the signature is the runner's for every family (the pooled input is
    unused: Flux.2 has none). With `tp`, this rank holds its shard of every attention and MLP."""

    # The repeated blocks, in execution order (compiled one by one, offloaded layer by layer).
    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def __init__(self, config: Flux2Config, tp: TensorParallel | None = None):
        super().__init__()
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        mlp, eps = config.mlp_hidden, config.eps
        if sum(config.axes_dims_rope) != head_dim:
            raise ValueError(f"axes_dims_rope {config.axes_dims_rope} must sum to attention_head_dim {head_dim}")
        out_channels = config.out_channels or config.in_channels
        self.time_guidance_embed = TimestepGuidanceEmbedding(config.timestep_guidance_channels, dim,
                                                             config.guidance_embeds)
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.x_embedder = nn.Linear(config.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = nn.ModuleList(
            [Flux2DoubleBlock(dim, heads, head_dim, mlp, eps, tp) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [Flux2SingleBlock(dim, heads, head_dim, mlp, eps, tp) for _ in range(config.num_single_layers)]
        )
        self.norm_out = OutputNorm(dim, eps)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * out_channels, bias=False)

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables [S_text + S_image, head_dim] for the joint [text; image] sequence (once per
        request), from the pipeline's 4-axis ids [S, 4] (`text_ids`, `image_ids`; one row set for
        the whole batch, as diffusers uses ids[0])."""
        n_axes = len(self.config.axes_dims_rope)
        if txt_ids.shape[-1] < n_axes or img_ids.shape[-1] < n_axes:
            raise ValueError(f"Flux.2 position ids need {n_axes} axes, got {txt_ids.shape[-1]} / {img_ids.shape[-1]}")
        return rope_tables(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope,
                           theta=float(self.config.rope_theta))

    def modulation(self, temb: torch.Tensor):
        """(double-block image, double-block text, single-block) modulation of this step, each a
        tuple of [B, 1, dim] vectors; computed once and shared by every block of its kind."""
        return (self.double_stream_modulation_img(temb), self.double_stream_modulation_txt(temb),
                self.single_stream_modulation(temb))

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
    ) -> torch.Tensor:
        """hidden_states [B, N, in_channels] packed latents (`pack`); encoder_hidden_states
        [B, S, joint_dim] (all padded prompt tokens, as the pipeline passes them); timestep [B]
        in the pipeline's t / 1000 scale; guidance [B], the guidance scale ([dev] only).
        Returns [B, N, out_channels]. `cache` (one per request branch, see
        services/denoiser/cache.py) may skip middle blocks."""
        # diffusers casts t and guidance to the input latents' dtype before scaling them.
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = self.time_guidance_embed(timestep, guidance)
        mod = self.modulation(temb)
        img = self.x_embedder(hidden_states)
        txt = self.context_embedder(encoder_hidden_states)
        text_len = txt.shape[1]

        # --- block cache (services/denoiser/cache.py) ---
        if cache is not None and cache.enabled:
            # One chain on the joint [text; image] state, as flux.py does.
            x = cache.run(self.block_steps(mod, rope, text_len), torch.cat([txt, img], dim=1))
            return self.proj_out(self.norm_out(x[:, text_len:], temb))
        # --- end block cache ---

        img_mod, txt_mod, single_mod = mod
        for block in self.transformer_blocks:
            img, txt = block(img, txt, img_mod, txt_mod, rope)

        x = torch.cat([txt, img], dim=1)
        for block in self.single_transformer_blocks:
            x = block(x, single_mod, rope)
        return self.proj_out(self.norm_out(x[:, text_len:], temb))

    # --- block cache (services/denoiser/cache.py) ---
    def block_steps(self, mod, rope: tuple[torch.Tensor, torch.Tensor], text_len: int):
        """One function per block (double, then single) on the joint state x = [text; image];
        `mod` is this step's `modulation(temb)`."""
        img_mod, txt_mod, single_mod = mod if mod is not None else (None, None, None)

        def double(block: Flux2DoubleBlock):
            def step(x: torch.Tensor) -> torch.Tensor:
                # Contiguous like the uncached path's img/txt (see flux.py: compiled blocks reuse graphs).
                img, txt = block(x[:, text_len:].contiguous(), x[:, :text_len].contiguous(), img_mod, txt_mod, rope)
                return torch.cat([txt, img], dim=1)

            return step

        def single(block: Flux2SingleBlock):
            return lambda x: block(x, single_mod, rope)

        return [double(b) for b in self.transformer_blocks] + [single(b) for b in self.single_transformer_blocks]

    # --- end block cache ---
