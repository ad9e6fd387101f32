"""Tiny diffusers-format checkpoints built offline, with random weights, for the tests.

Nothing here downloads: the weights are random (seeded), the CLIP and T5 tokenizers are trained
with the `tokenizers` library on a small generated corpus and wrapped in the transformers
tokenizer classes that the real checkpoints name, and every component is written with the
library's own `save_pretrained`, so loading goes through exactly the code a real model uses.

    python -m tests.tiny_checkpoints OUT_DIR [--schnell] [--seed N]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from training.tokenizers import clip_tokenizer, t5_tokenizer

_WORDS = (
    "a an the red green blue yellow white black purple orange circle square triangle cat dog "
    "photo painting of on in with and small big large tiny bright dark background sky sea "
    "mountain city street tree flower house car bird fish sun moon star night day light"
).split()


def _corpus(seed: int, n: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def build_clip_tokenizer(seed: int = 0, vocab_size: int = 600):
    return clip_tokenizer(_corpus(seed), vocab_size)


def build_t5_tokenizer(seed: int = 0, vocab_size: int = 300):
    return t5_tokenizer(_corpus(seed + 1), vocab_size)


def tiny_transformer_config(guidance_embeds: bool = True, head_dim: int = 16) -> dict:
    """`head_dim` 128 for kernels that take no smaller heads (cuDNN's fp8 attention)."""
    return dict(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 6, 6] if head_dim == 16 else [head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16],
    )


def build_tiny_flux(out_dir: str | Path, *, guidance_embeds: bool = True, seed: int = 0, t5_d_ff: int = 37,
                    head_dim: int = 16) -> Path:
    """Write a complete FluxPipeline directory (model_index.json + 7 components) and return it.
    `t5_d_ff`: T5's feed-forward width (37 is prime: no tensor-parallel degree splits it; 36 splits over 2)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = Path(out_dir)
    clip_tok = build_clip_tokenizer(seed)
    t5_tok = build_t5_tokenizer(seed)

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_transformer_config(guidance_embeds, head_dim))
    # Random init leaves AdaLN-zero gates and the output projection at small values that
    # make outputs nearly constant; widen them so the parity tests see real signal.
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0.0, 0.2)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=t5_d_ff,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--schnell", action="store_true", help="no guidance embedding (Flux.1-schnell layout)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_flux(args.out_dir, guidance_embeds=not args.schnell, seed=args.seed))


if __name__ == "__main__":
    main()
