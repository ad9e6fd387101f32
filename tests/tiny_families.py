"""Tiny checkpoints of diffusers pipelines that ditserve has no native family for (served by the
diffusers backend, services/denoiser/diffusers_backend.py): Stable Diffusion 3 and PixArt-Sigma.
Built offline like tests/tiny_checkpoints.py: seeded random weights, tokenizers trained with the
`tokenizers` library, every component written with `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_checkpoints import build_clip_tokenizer, build_t5_tokenizer


def _clip_with_projection(tok, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def _t5(tok, seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))


def _vae(seed: int, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16],
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64, **extra)


def _widen(model: torch.nn.Module) -> None:
    # Zero-initialised gates and output layers make random DiTs output ~constants; widen them.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)


def build_tiny_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """StableDiffusion3Pipeline: CLIP-L, CLIP-G (with projection), T5, an MMDiT, AutoencoderKL."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = build_clip_tokenizer(seed), build_clip_tokenizer(seed + 1), build_t5_tokenizer(seed)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4)
    _widen(transformer)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip_with_projection(tok, seed), tokenizer=tok,
        text_encoder_2=_clip_with_projection(tok2, seed + 1), tokenizer_2=tok2,
        text_encoder_3=_t5(tok3, seed), tokenizer_3=tok3)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def build_tiny_pixart_sigma(out_dir: str | Path, seed: int = 0) -> Path:
    """PixArtSigmaPipeline: T5, a PixArt DiT (AdaLN-single, cross-attention), AutoencoderKL."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tok = build_t5_tokenizer(seed)
    torch.manual_seed(seed)
    # sample_size 32: the pipeline's resolution binning knows 32 (256 px), 64, 128 and 256.
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    _widen(transformer)
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=_t5(tok, seed), vae=_vae(seed, scaling_factor=0.13025),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def _wan_components(seed: int, in_channels: int = 16, image_dim: int | None = None, ti2v: bool = False) -> dict:
    """Tokenizer, UMT5 text encoder, one Wan 3D DiT and Wan's causal video VAE (4x in time).
    `image_dim`: Wan 2.1 I2V's DiT, which cross-attends to CLIP image tokens of that width too.
    `ti2v`: Wan 2.2 TI2V-5B's VAE instead (16x in space: 2x2 pixel patches, then 8x; residual
    blocks), 8 latent channels here (48 in the real one), and a DiT of those channels."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = build_t5_tokenizer(seed)
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    image = {"image_dim": image_dim, "added_kv_proj_dim": 2 * 12} if image_dim else {}
    latent = 8 if ti2v else 16
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=latent if ti2v else in_channels,
        out_channels=latent,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **image)
    _widen(transformer)
    torch.manual_seed(seed)
    if ti2v:  # per-channel statistics that are not the identity, so encode and decode must undo them right
        vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                               in_channels=12, out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
                               latents_mean=[0.1, -0.2, 0.3, 0.0, 0.05, -0.1, 0.2, 0.0],
                               latents_std=[1.5, 0.8, 2.0, 1.2, 1.0, 0.9, 1.1, 1.3])
    else:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    return {"tokenizer": tok, "text_encoder": text_encoder, "transformer": transformer, "vae": vae}


def _add_second_expert(parts: dict, seed: int) -> None:
    """Wan 2.2 A14B's layout: a second DiT (transformer_2) after the boundary timestep."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed + 1)
    parts["transformer_2"] = WanTransformer3DModel(**parts["transformer"].config)
    _widen(parts["transformer_2"])
    parts["boundary_ratio"] = 0.875


def build_tiny_wan(out_dir: str | Path, seed: int = 0, two_experts: bool = False) -> Path:
    """WanPipeline (Wan 2.1 text-to-video). `two_experts`: Wan 2.2 A14B's layout, a second DiT
    (transformer_2) for the low-noise steps after the boundary timestep."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    parts = _wan_components(seed)
    if two_experts:
        _add_second_expert(parts, seed)
    pipe = WanPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), **parts)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def build_tiny_wan_i2v(out_dir: str | Path, seed: int = 0, clip: bool = False, two_experts: bool = False) -> Path:
    """WanImageToVideoPipeline: the first frame is VAE-encoded and joins the noise as 4 mask + 16
    latent channels (in_channels 36). Without `clip` the Wan 2.2 layout (no image encoder); with
    it Wan 2.1 I2V's, whose DiT also cross-attends to a CLIP vision model's tokens (a 28x28
    input, 2x2 patches of 14: 5 tokens). `two_experts`: Wan 2.2 I2V A14B's transformer_2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    parts = _wan_components(seed, in_channels=36, image_dim=16 if clip else None)
    if clip:
        torch.manual_seed(seed + 2)
        parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=16, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, image_size=28,
            patch_size=14, projection_dim=16))
        parts["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 28},
                                                      crop_size={"height": 28, "width": 28})
    if two_experts:
        _add_second_expert(parts, seed)
    pipe = WanImageToVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), **parts)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def build_tiny_wan_ti2v(out_dir: str | Path, seed: int = 0, i2v: bool = False) -> Path:
    """Wan 2.2 TI2V-5B's layout (expand_timesteps: a timestep per token; its 16x VAE): WanPipeline
    for text-to-video, or WanImageToVideoPipeline (`i2v`), whose first latent frame is the image's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    cls = WanImageToVideoPipeline if i2v else WanPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), expand_timesteps=True,
               **_wan_components(seed, ti2v=True))
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


# Qwen's chat format, as Qwen3's tokenizer_config.json has it (the part the pipelines use).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_qwen_tokenizer(seed: int = 0, vocab_size: int = 500):
    """A byte-level BPE with Qwen's special tokens and chat template, as `Qwen2TokenizerFast`."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_checkpoints import _corpus

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(seed + 2), trainer=BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=QWEN_CHAT_TEMPLATE, model_max_length=32768)


def build_tiny_z_image(out_dir: str | Path, seed: int = 0) -> Path:
    """ZImagePipeline (Z-Image Turbo's layout): a Qwen3 text encoder, the single-stream Z-Image
    DiT with its noise / context refiners, AutoencoderKL."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = build_qwen_tokenizer(seed)
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=tok.pad_token_id))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    _widen(transformer)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(seed, scaling_factor=0.3611,
                          shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
                          text_encoder=text_encoder, tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def _qwen_vl(tok, seed: int):
    """A tiny Qwen2.5-VL (vision tower included) whose special-token ids are `tok`'s."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]  # ids the model config names
    tok.add_special_tokens({"additional_special_tokens": vision})
    start, end, pad = tok.convert_tokens_to_ids(vision)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1000000.0, "vocab_size": len(tok),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "bos_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tok), vision_start_token_id=start, vision_end_token_id=end,
        image_token_id=pad, vision_token_id=pad, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))


def _qwen_image_dit():
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    _widen(transformer)
    return transformer


def _qwen_image_scheduler():
    """Qwen-Image's own scheduler config: resolution-dependent exponential shift, terminal 0.02."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


def qwen_vl_processor(processor_dir: str | Path):
    """diffusers' `processor` for a tiny edit checkpoint: a Qwen2VLProcessor of the saved
    tokenizer and image processor. Its constructor insists on a video processor, which needs
    torchvision (not installed here, and unused by the edit pipelines), so its attributes are set
    as __init__ would; __call__ is transformers' own."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor

    tok = AutoTokenizer.from_pretrained(processor_dir)
    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id, proc.video_token_id = tok.convert_tokens_to_ids("<|image_pad|>"), None
    proc.image_processor, proc.tokenizer = AutoImageProcessor.from_pretrained(processor_dir), tok
    proc.video_processor, proc.chat_template = None, None
    return proc


def build_tiny_qwen_image_edit(out_dir: str | Path, seed: int = 0, plus: bool = False) -> Path:
    """QwenImageEditPipeline (or QwenImageEditPlusPipeline): Qwen-Image's layout with a Qwen2.5-VL
    that sees the input image (its processor/ folder: the tokenizer and Qwen2VLImageProcessor,
    capped at 112x112 pixels so the vision tower stays cheap), and a VAE that also encodes. The
    pipelines encode input images at about 1024x1024, so the VAE is narrower than Qwen-Image's."""
    import json

    from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline, QwenImageEditPlusPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_qwen_tokenizer(seed)
    text_encoder = _qwen_vl(tok, seed)
    transformer = _qwen_image_dit()
    torch.manual_seed(seed)
    # Qwen-Image's downsampling by 8, so the ~1024x1024 input image is 64x64 tokens, not 128x128.
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.05],
                                 latents_std=[1.5, 0.8, 2.0, 1.2])
    scheduler = _qwen_image_scheduler()
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    # The processor is written by hand below (see qwen_vl_processor); model_index.json names it.
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, processor=None,
               transformer=transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    out = Path(out_dir)
    index = json.loads((out / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(out / "processor")
    tok.save_pretrained(out / "processor")
    return out


def build_tiny_qwen_image(out_dir: str | Path, seed: int = 0) -> Path:
    """QwenImagePipeline: a Qwen2.5-VL text encoder (its vision tower unused for text-to-image),
    the Qwen-Image MMDiT, Qwen-Image's VAE. True CFG with a negative prompt is its default."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    tok = build_qwen_tokenizer(seed)
    text_encoder = _qwen_vl(tok, seed)
    transformer = _qwen_image_dit()
    torch.manual_seed(seed)
    # A per-channel normalisation that is not the identity, so decoding must undo it right.
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.05],
                                 latents_std=[1.5, 0.8, 2.0, 1.2])
    scheduler = _qwen_image_scheduler()
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def _flux2_parts(seed: int, guidance_embeds: bool):
    """The Flux.2 MMDiT (`guidance_embeds`: [dev]'s guidance embedding), Flux.2's VAE and a
    dynamically shifting scheduler (so the schedule depends on the mu the pipeline passes). The
    DiT draws from the RNG as it stands, i.e. right after the caller's text encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=guidance_embeds)
    _widen(transformer)
    return transformer, _flux2_vae(seed), FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


def _flux2_vae(seed: int):
    """Flux.2's VAE (2x2 latent patches) with batch-norm statistics that are not the identity."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # decoding must undo these right
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, vae.bn.num_features))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.num_features))
    return vae


def build_tiny_flux2_klein(out_dir: str | Path, seed: int = 0, is_distilled: bool = False) -> Path:
    """Flux2KleinPipeline (Flux.2 [klein]): a Qwen3 causal LM whose layers 9 / 18 / 27 feed the
    DiT (so 28 tiny layers), the Flux.2 MMDiT, Flux.2's VAE (2x2 latent patches) with batch-norm
    statistics that are not the identity, and dynamic shifting (so the schedule depends on the mu
    the pipeline passes, Flux.2's empirical one). `is_distilled`: the step-distilled variant's flag."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_qwen_tokenizer(seed)
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=37, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=tok.pad_token_id))
    transformer, vae, scheduler = _flux2_parts(seed, guidance_embeds=False)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer, is_distilled=is_distilled)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


# Enough of Mistral Small 3's chat template for a system turn and text user turns, in its markup.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% endif %}{% endfor %}[/INST]"
    "{% endif %}{% endfor %}"
)


def build_tiny_flux2_dev(out_dir: str | Path, seed: int = 0) -> Path:
    """Flux2Pipeline (Flux.2 [dev]): a Mistral 3 (30 tiny layers: the pipeline reads 10, 20, 30;
    a one-layer Pixtral vision tower, unused for text), the Flux.2 MMDiT with its guidance
    embedding, Flux.2's batch-norm VAE. Its `tokenizer` component is a PixtralProcessor folder as
    the real checkpoint ships it (tokenizer files, chat template, preprocessor and processor
    configs); the processor class needs torchvision, so tests hand diffusers the tokenizer in it."""
    import json

    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = build_qwen_tokenizer(seed)
    tok.add_special_tokens({"additional_special_tokens": ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]",
                                                          "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"]})
    tok.bos_token, tok.chat_template = "<|im_start|>", MISTRAL_CHAT_TEMPLATE
    torch.manual_seed(seed)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 37,
                     "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "max_position_embeddings": 1024, "pad_token_id": tok.pad_token_id},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 64, "patch_size": 16},
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2))
    transformer, vae, scheduler = _flux2_parts(seed, guidance_embeds=True)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                         transformer=transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    out = Path(out_dir)
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "PixtralProcessor"]}))
    PixtralImageProcessorPil().save_pretrained(out / "tokenizer")
    (out / "tokenizer" / "processor_config.json").write_text(json.dumps(
        {"processor_class": "PixtralProcessor", "patch_size": 16, "spatial_merge_size": 2, "image_token": "[IMG]",
         "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}))
    return out
