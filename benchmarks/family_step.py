"""One denoiser step for the families beyond Flux.1 (with CFG: two DiT passes, as the pipelines
run them with a negative prompt; Z-Image-Turbo: one, its guidance 0): ditserve's native DiT
against diffusers' on the same random weights, the same card, in the same run.

    python benchmarks/family_step.py --family qwen-image              # 1024x1024, 128 + 32 text tokens
    python benchmarks/family_step.py --family qwen-image-edit         # 1024x1024 from a 1024x1024 image
    python benchmarks/family_step.py --family wan2.1-t2v-14b          # 832x480, 81 frames (32760 tokens)
    python benchmarks/family_step.py --family wan2.1-i2v-14b          # the same with I2V's channels + CLIP
    python benchmarks/family_step.py --family wan2.2-ti2v-5b --width 1280 --height 704 --num-frames 121
    python benchmarks/family_step.py --family z-image-turbo           # 1024x1024, 128 caption tokens
    python benchmarks/family_step.py --family qwen-image --tiny --device cpu   # the code path, on CPU

A step is what the pipelines run per denoising step with a negative prompt: the DiT on the
positive prompt, then on the negative one (QwenImagePipeline with true_cfg_scale > 1, WanPipeline
with guidance_scale > 1), each with its own text length. Rows as dit_step.py's (whose timing,
ceiling and table code this reuses): diffusers eager / compiled (compile_repeated_blocks),
ditserve eager / compiled (the service's compile path) / fp8 compiled; the native module is
loaded from diffusers' state dict with assign=True, so both share one set of weight tensors."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dit_step import Table, matmul_ceiling, timed  # noqa: E402
from benchmarks.random_checkpoint import materialise  # noqa: E402


@dataclass
class Bench:
    ref: torch.nn.Module
    native: torch.nn.Module
    diffusers_step: Callable[[], torch.Tensor]
    native_step: Callable[[torch.nn.Module], Callable[[], torch.Tensor]]
    flops: float
    title: str


# Qwen/Qwen-Image transformer/config.json
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json
WAN_T2V_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                   out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# Wan-AI/Wan2.1-I2V-14B-480P-Diffusers transformer/config.json: 36 input channels (noise, first-frame
# mask and latents) and cross-attention to 257 CLIP ViT-H tokens next to the text.
WAN_I2V_14B = dict(WAN_T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
# Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer/config.json: 48 latent channels (its 16x VAE), a
# timestep per token (expand_timesteps).
WAN_TI2V_5B = dict(WAN_T2V_14B, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336,
                   num_layers=30)
# Qwen-Image-Edit: the input image's Qwen2.5-VL tokens join the prompt's. A ~1024x1024 image is
# smart-resized to 1036x1036, 37x37 patches of 28 merged 2x2: 342 vision tokens.
QWEN_EDIT_VISION_TOKENS = 342


def _shared(ref, native_cls, config):
    """The native module on the reference's own tensors."""
    with torch.device("meta"):
        native = native_cls(config)
    native.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return native.eval().requires_grad_(False)


def qwen_image_edit(args, device, dtype, tiny: bool) -> Bench:
    """Qwen-Image-Edit: the output's tokens followed by the input image's (the same size here),
    the text its prompt's plus the image's vision tokens; the output keeps the first half."""
    return qwen_image(args, device, dtype, tiny, edit=True)


def qwen_image(args, device, dtype, tiny: bool, edit: bool = False) -> Bench:
    from diffusers import QwenImageTransformer2DModel

    from services.denoiser.latents import CenteredLatents2x2
    from services.denoiser.models.qwen_image import QwenImageConfig, QwenImageTransformer

    cfg = dict(QWEN_IMAGE, num_layers=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=32,
               in_channels=16, out_channels=4, axes_dims_rope=(8, 4, 4)) if tiny else QWEN_IMAGE
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    ref = materialise(lambda: QwenImageTransformer2DModel(**cfg), device, dtype).eval().requires_grad_(False)
    # Its RoPE tables are plain attributes built in __init__ (on meta, above): build them for real.
    ref.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(cfg["axes_dims_rope"]), scale_rope=True)
    config = QwenImageConfig.from_dict(cfg)
    native = _shared(ref, QwenImageTransformer, config)
    layout = CenteredLatents2x2(config.in_channels // 4, 8)
    h, w = layout.latent_hw(args.height, args.width)
    g = torch.Generator(device).manual_seed(1)
    images = 2 if edit else 1  # the output, then the input image's latents (edit)
    x = torch.randn(1, images * (h // 2) * (w // 2), config.in_channels, generator=g, device=device, dtype=dtype)
    vision = QWEN_EDIT_VISION_TOKENS if edit and not tiny else 0
    text_lens = (args.text_len + vision, args.neg_text_len + vision)
    texts = [torch.randn(1, n, config.joint_attention_dim, generator=g, device=device, dtype=dtype)
             for n in text_lens]
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    grids = ((h, w),) * images
    with torch.inference_mode():  # once per request in the runner
        ropes = [layout.rope(native, c.shape[1], grids[0], device, references=grids[1:]) for c in texts]
    out_tokens = (h // 2) * (w // 2)

    def diffusers_step():
        with torch.inference_mode():
            return torch.stack([ref(hidden_states=x, encoder_hidden_states=c, encoder_hidden_states_mask=None,
                                    timestep=t, img_shapes=[[(1, h // 2, w // 2)] * images],
                                    return_dict=False)[0][:, :out_tokens] for c in texts])

    def native_step(model, tables: bool = False):
        # tables: this step's row of the request's modulation table (runner.precompute), one for
        # both passes, as a replica runs Qwen-Image
        mods = None
        if tables:
            with torch.inference_mode():
                mods = model.modulation_table(t, None, None, dtype)

        def fn():
            with torch.inference_mode():
                return torch.stack([model(x, c, None, t, r, modulations=mods)[:, :out_tokens]
                                    for c, r in zip(texts, ropes)])
        return fn

    n, d = x.shape[1], config.inner_dim
    flops = sum(config.num_layers * (24 * (n + c.shape[1]) * d * d + 4 * (n + c.shape[1]) ** 2 * d) for c in texts)
    what = f"Qwen-Image-Edit {args.height}x{args.width} from a same-size image" if edit else \
        f"Qwen-Image {args.height}x{args.width}"
    return Bench(ref, native, diffusers_step, native_step, flops,
                 f"{what} ({n} image tokens, text {text_lens[0]} / {text_lens[1]} tokens), true CFG: "
                 "2 DiT passes per step")


def wan_i2v(args, device, dtype, tiny: bool) -> Bench:
    """Wan 2.1 I2V-14B: the step of LightX2V's published table (480p, with CFG)."""
    return wan(args, device, dtype, tiny, i2v=True)


def wan_ti2v(args, device, dtype, tiny: bool) -> Bench:
    """Wan 2.2 TI2V-5B text-to-video at its 1280x704, 121 frames: a timestep per token."""
    return wan(args, device, dtype, tiny, ti2v=True)


def wan(args, device, dtype, tiny: bool, i2v: bool = False, ti2v: bool = False) -> Bench:
    from diffusers import WanTransformer3DModel

    from services.denoiser.models.wan import WanConfig, WanTransformer, patchify, unpatchify

    base = WAN_I2V_14B if i2v else WAN_TI2V_5B if ti2v else WAN_T2V_14B
    cfg = dict(base, num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=48, num_layers=2,
               **({"image_dim": 16, "added_kv_proj_dim": 24} if i2v else {})) if tiny else base
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    ref = materialise(lambda: WanTransformer3DModel(**cfg), device, dtype).eval().requires_grad_(False)
    # materialise zeroes buffers; the RoPE tables are non-persistent ones: build them for real.
    ref.rope = WanRotaryPosEmbed(cfg["attention_head_dim"], cfg["patch_size"], cfg["rope_max_seq_len"]).to(device)
    config = WanConfig.from_dict(cfg)
    native = _shared(ref, WanTransformer, config)
    spatial = 16 if ti2v else 8  # TI2V-5B's VAE compresses 16x
    frames, h, w = (args.num_frames - 1) // 4 + 1, args.height // spatial, args.width // spatial
    g = torch.Generator(device).manual_seed(1)
    latents = torch.randn(1, config.in_channels, frames, h, w, generator=g, device=device, dtype=dtype)
    # WanPipeline pads every prompt to 512 T5 tokens (zeros past its length), positive and negative.
    texts = [torch.randn(1, 512, config.text_dim, generator=g, device=device, dtype=dtype) for _ in range(2)]
    # Wan 2.1 I2V: 257 CLIP tokens (the same for both branches); the latents above have the
    # 36 input channels, as the pipeline's cat([latents, condition]) hands them over.
    image = {"encoder_hidden_states_image": torch.randn(1, 257, config.image_dim, generator=g, device=device,
                                                        dtype=dtype)} if i2v else {}
    patch = config.patch_size
    t = torch.full((1,), 500.0, device=device)
    if ti2v:  # WanPipeline's (mask * t) over the (f, h/2, w/2) token grid: one timestep per token
        t = torch.full((1, frames * (h // patch[1]) * (w // patch[2])), 500.0, device=device)
    with torch.inference_mode():
        rope = native.rope(frames, h, w, device=device)

    def diffusers_step():
        with torch.inference_mode():
            return torch.stack([ref(hidden_states=latents, timestep=t, encoder_hidden_states=c, return_dict=False,
                                    **image)[0] for c in texts])

    def native_step(model):
        def fn():
            with torch.inference_mode():
                tokens = patchify(latents, patch)
                out = [unpatchify(model(tokens, c, None, t, rope, **image), frames, h, w, patch,
                                  config.out_channels or 16) for c in texts]
                return torch.stack(out)
        return fn

    n, d, text = frames * h * w // (patch[1] * patch[2]), config.inner_dim, 512 + (257 if i2v else 0)
    per_pass = config.num_layers * 2 * (n * (6 * d * d + 2 * d * config.ffn_dim) + 2 * n * n * d + 2 * n * text * d)
    name = "Wan 2.2 TI2V-5B" if ti2v else f"Wan 2.1 {'I2V' if i2v else 'T2V'}-14B"
    return Bench(ref, native, diffusers_step, native_step, 2 * per_pass,
                 f"{name} {args.width}x{args.height}, {args.num_frames} frames "
                 f"({n} tokens, 512 text{' + 257 CLIP' if i2v else ''}), CFG: 2 DiT passes per step")


def z_image(args, device, dtype, tiny: bool) -> Bench:
    """Z-Image-Turbo: guidance 0 is its setting, so one DiT pass per step (no CFG)."""
    from diffusers import ZImageTransformer2DModel

    from services.denoiser.latents import pad_tokens, patchify, unpatchify
    from services.denoiser.models.z_image import ZImageConfig, ZImageTransformer

    cfg = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
               axes_dims=[16, 8, 8], axes_lens=[1024, 128, 128]) if tiny else {}  # diffusers' defaults: Turbo's
    ref = materialise(lambda: ZImageTransformer2DModel(**cfg), device, dtype).eval().requires_grad_(False)
    config = ZImageConfig.from_dict(dict(ref.config))
    native = _shared(ref, ZImageTransformer, config)
    h, w = args.height // 8, args.width // 8
    g = torch.Generator(device).manual_seed(1)
    latents = torch.randn(1, config.in_channels, h, w, generator=g, device=device, dtype=dtype)
    caps = torch.randn(1, args.text_len, config.cap_feat_dim, generator=g, device=device, dtype=dtype)
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    with torch.inference_mode():
        rope = native.rope(args.text_len, h, w, device=device)
        x, c = pad_tokens(patchify(latents)), pad_tokens(caps)

    def diffusers_step():
        with torch.inference_mode():
            return torch.stack(ref(list(latents.unsqueeze(2).unbind(0)), t, list(caps.unbind(0)),
                                   return_dict=False)[0])[:, :, 0]

    def native_step(model):
        def fn():
            with torch.inference_mode():
                return unpatchify(model(x, c, None, t, rope), (h, w))
        return fn

    n, d = x.shape[1] + c.shape[1], config.dim
    layers = config.n_layers + config.n_refiner_layers  # refiners see one part each: counted whole, an upper bound
    flops = layers * (2 * n * (4 * d * d + 3 * d * int(d / 3 * 8)) + 4 * n * n * d)
    return Bench(ref, native, diffusers_step, native_step, flops,
                 f"Z-Image-Turbo {args.height}x{args.width} ({x.shape[1]} image + {c.shape[1]} caption tokens, "
                 "padded), one DiT pass per step (guidance 0)")


FAMILIES = {"qwen-image": qwen_image, "qwen-image-edit": qwen_image_edit, "wan2.1-t2v-14b": wan,
            "wan2.1-i2v-14b": wan_i2v, "wan2.2-ti2v-5b": wan_ti2v, "z-image-turbo": z_image}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="qwen-image")
    ap.add_argument("--tiny", action="store_true", help="a tiny config of the same classes (CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--height", type=int, default=None, help="default: 1024 (Qwen-Image), 480 (Wan)")
    ap.add_argument("--width", type=int, default=None, help="default: 1024 (Qwen-Image), 832 (Wan)")
    ap.add_argument("--num-frames", type=int, default=81)
    ap.add_argument("--text-len", type=int, default=128, help="Qwen-Image: the positive prompt's tokens")
    ap.add_argument("--neg-text-len", type=int, default=32, help="Qwen-Image: the negative prompt's tokens")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--fp8-attention", action="store_true",
                    help="also the fp8 row with fp8 attention (--dit-attention-precision fp8; needs cudnn-frontend)")
    ap.add_argument("--variable-text", action="store_true",
                    help="a row compiled as a replica of a variable-text family is (text length dynamic)")
    args = ap.parse_args()
    video = args.family.startswith("wan")
    args.height = args.height or (480 if video else 1024)
    args.width = args.width or (832 if video else 1024)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    from services.denoiser.compile import compile_blocks
    from services.denoiser.quant import apply_precision

    precomputed: list[str] = []

    def with_tables(model, name: str, *extra, **kw) -> None:
        """The row again with the modulations precomputed per request (what a replica runs for a
        family with modulation_table), and what making the table costs."""
        if not hasattr(model, "modulation_table"):
            return
        table.run(f"{name} + modulation tables", bench.native_step(model, tables=True), args.warmup, *extra, **kw)
        t = torch.full((50,), 0.5, device=device)

        def make():
            with torch.inference_mode():
                return model.modulation_table(t, None, None, dtype)
        precomputed.append(f"{name}: {timed(make, device, 2, 5)[0]:.2f} ms")

    t0 = time.perf_counter()
    bench = FAMILIES[args.family](args, device, dtype, args.tiny)
    build_s = time.perf_counter() - t0
    table = Table(device, args.iters, bench.flops, matmul_ceiling(device))
    table.run("diffusers eager", bench.diffusers_step, args.warmup)
    table.run("ditserve eager", bench.native_step(bench.native), args.warmup)
    if args.no_compile:
        with_tables(bench.native, "ditserve eager")
    if not args.no_compile:
        bench.ref.compile_repeated_blocks(fullgraph=True)
        table.run("diffusers compiled", bench.diffusers_step, args.warmup)
        compile_blocks(bench.native)
        table.run("ditserve compiled", bench.native_step(bench.native), args.warmup)
        with_tables(bench.native, "ditserve compiled")
        if args.variable_text:  # how a Qwen-Image / Z-Image replica compiles (spec.variable_text)
            dynamic = _shared(bench.native, type(bench.native), bench.native.config)
            compile_blocks(dynamic, variable_text=True)
            table.run("ditserve compiled, dynamic text", bench.native_step(dynamic), args.warmup)
    if not args.no_fp8 and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        fp8 = _shared(bench.native, type(bench.native), bench.native.config)
        before = {id(p): p.numel() * p.element_size() for p in fp8.parameters()}
        apply_precision(fp8, "fp8")  # the blocks' linears become e4m3 copies; the bf16 ones stay for the rows above
        # bytes of the bf16 tensors fp8 replaced: on the device only for the other rows
        replaced = sum(b for i, b in before.items() if i not in {id(p) for p in fp8.parameters()})
        if not args.no_compile:
            compile_blocks(fp8)
        base = "ditserve compiled" if not args.no_compile else "ditserve eager"
        table.run("ditserve fp8" + (" compiled" if not args.no_compile else ""), bench.native_step(fp8), args.warmup,
                  "fp8", base, not_mine_bytes=replaced)
        with_tables(fp8, "ditserve fp8" + (" compiled" if not args.no_compile else ""), "fp8", base,
                    not_mine_bytes=replaced)
        if args.fp8_attention:
            from services.denoiser.attention import attention_precision

            step = bench.native_step(fp8)

            def fp8_attention_step():
                with attention_precision("fp8"):
                    return step()
            table.run("ditserve fp8 + fp8 attention" + (" compiled" if not args.no_compile else ""),
                      fp8_attention_step, args.warmup, "fp8", base, not_mine_bytes=replaced)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if precomputed:
        print("modulation tables, once per request of 50 steps: " + "; ".join(precomputed))
    table.print(f"\n{bench.title}; {str(dtype).removeprefix('torch.')}, {name}, torch {torch.__version__}; "
                f"{bench.flops / 1e12:.1f} TFLOP/step; weights built in {build_s:.1f}s")


if __name__ == "__main__":
    main()
