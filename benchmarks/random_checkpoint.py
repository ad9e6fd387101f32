"""Write a diffusers-format Flux.1 directory with the real architectures and random weights.

    python benchmarks/random_checkpoint.py OUT_DIR --model flux-dev --device cuda

Speed does not depend on weight values, so this stands in for FLUX.1-dev (12B DiT, T5-XXL,
CLIP-L, the 16-channel VAE) where nothing can be downloaded. Modules are built on the meta
device in bf16 and materialised on `device`, so building costs no fp32 host copy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.tiny_checkpoints import build_clip_tokenizer, build_t5_tokenizer  # noqa: E402

FLUX_DEV = dict(
    transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=[16, 56, 56]),
    vae=dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
             up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
             latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
             use_quant_conv=False, use_post_quant_conv=False),
    clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
            feed_forward_proj="gated-gelu", vocab_size=32128, is_encoder_decoder=False),
)


def materialise(make, device, dtype=torch.bfloat16, std=0.02):
    """Build `make()` on meta in `dtype`, allocate it once on `device`, fill it with N(0, std)
    (norm weights 1, biases 0)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            module = make()
    finally:
        torch.set_default_dtype(default)
    module = module.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=g)
        for b in module.buffers():
            if b.is_floating_point():
                b.zero_()
    return module


def build(out_dir: str | Path, device: str = "cuda") -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = Path(out_dir)
    cfg = FLUX_DEV
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    clip_cfg = CLIPTextConfig(vocab_size=49408, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                              pad_token_id=clip_tok.pad_token_id, **cfg["clip"])
    t5_cfg = T5Config(pad_token_id=0, eos_token_id=1, **cfg["t5"])
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
        vae=materialise(lambda: AutoencoderKL(**cfg["vae"]), device),
        text_encoder=materialise(lambda: CLIPTextModel(clip_cfg), device),
        tokenizer=clip_tok,
        text_encoder_2=materialise(lambda: T5EncoderModel(t5_cfg), device),
        tokenizer_2=t5_tok,
        transformer=materialise(lambda: FluxTransformer2DModel(**cfg["transformer"]), device),
    )
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--model", choices=["flux-dev"], default="flux-dev")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(build(args.out_dir, args.device))
