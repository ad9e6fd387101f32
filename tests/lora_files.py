"""Synthetic Flux LoRA files in each layout services/denoiser/lora/formats.py reads.

    state = flux_lora_state(config, "kohya", rank=4, seed=0)   # key -> tensor, as a file holds it
    path = write_lora(tmp_path / "style.safetensors", state)

Every layout targets every module it has a name for in the double and single blocks (fused ones
whole); `top_level=True` adds the embedders and the final layer. Values are random and seeded;
alphas, where a layout has them, differ per module (scales 0.5 to 2.5) so a mis-scaled module
shows. `config` is the transformer's FluxConfig (or its config.json dict)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from services.denoiser.lora.formats import flux_module_shapes
from services.denoiser.models.flux import FluxConfig

# name -> what its keys look like
LAYOUTS = {
    "diffusers": "transformer.<diffusers module>.lora_A.weight / lora_B.weight / .alpha",
    "peft": "<diffusers module>.lora_A.default.weight / lora_B.default.weight (no prefix, no alpha)",
    "kohya": "lora_unet_<BFL module with underscores>.lora_down.weight / lora_up.weight / .alpha",
    "comfy": "diffusion_model.<BFL module>.lora_down.weight / lora_up.weight / .alpha",
    "bfl": "<BFL module>.lora_A.weight / lora_B.weight (no alpha)",
    "xlabs": "double_blocks.N.processor.{qkv,proj}_lora{1,2}.down.weight / up.weight (no alpha)",
}


def bfl_module_shapes(config: FluxConfig, top_level: bool = True) -> dict[str, tuple[int, int]]:
    """BFL's (original Flux repo) module names -> (out, in)."""
    d, p2 = config.inner_dim, config.patch_size**2
    shapes = {}
    for i in range(config.num_layers):
        for s in ("img", "txt"):
            shapes |= {
                f"double_blocks.{i}.{s}_attn.qkv": (3 * d, d),
                f"double_blocks.{i}.{s}_attn.proj": (d, d),
                f"double_blocks.{i}.{s}_mlp.0": (4 * d, d),
                f"double_blocks.{i}.{s}_mlp.2": (d, 4 * d),
                f"double_blocks.{i}.{s}_mod.lin": (6 * d, d),
            }
    for i in range(config.num_single_layers):
        shapes |= {
            f"single_blocks.{i}.linear1": (7 * d, d),
            f"single_blocks.{i}.linear2": (d, 5 * d),
            f"single_blocks.{i}.modulation.lin": (3 * d, d),
        }
    if top_level:
        embedders = {"time_in": 256, "vector_in": config.pooled_projection_dim}
        if config.guidance_embeds:
            embedders["guidance_in"] = 256
        for name, n_in in embedders.items():
            shapes |= {f"{name}.in_layer": (d, n_in), f"{name}.out_layer": (d, d)}
        shapes |= {
            "img_in": (d, config.in_channels * p2),
            "txt_in": (d, config.joint_attention_dim),
            "final_layer.linear": ((config.out_channels or config.in_channels) * p2, d),
            "final_layer.adaLN_modulation.1": (2 * d, d),
        }
    return shapes


def xlabs_module_shapes(config: FluxConfig) -> dict[str, tuple[int, int]]:
    """XLabs' processor LoRAs (x-flux): beside the attention of double and single blocks."""
    d = config.inner_dim
    shapes = {}
    for i in range(config.num_layers):
        for n in (1, 2):
            shapes |= {
                f"double_blocks.{i}.processor.qkv_lora{n}": (3 * d, d),
                f"double_blocks.{i}.processor.proj_lora{n}": (d, d),
            }
    for i in range(config.num_single_layers):
        shapes |= {
            f"single_blocks.{i}.processor.qkv_lora": (3 * d, d),
            f"single_blocks.{i}.processor.proj_lora": (d, 5 * d),
        }
    return shapes


def flux_lora_state(
    config: FluxConfig | dict,
    layout: str,
    *,
    rank: int = 4,
    seed: int = 0,
    std: float = 0.1,
    top_level: bool = False,
) -> dict[str, torch.Tensor]:
    """A LoRA for the Flux transformer `config` in `layout` (a key of LAYOUTS)."""
    if isinstance(config, dict):
        config = FluxConfig.from_dict(config)
    if layout in ("diffusers", "peft"):
        shapes = {
            k: v
            for k, v in flux_module_shapes(config).items()
            if top_level or k.startswith(("transformer_blocks.", "single_transformer_blocks."))
        }
    elif layout == "xlabs":
        shapes = xlabs_module_shapes(config)
    elif layout in ("kohya", "comfy", "bfl"):
        shapes = bfl_module_shapes(config, top_level)
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")

    key, down, up, alpha = {
        "diffusers": ("transformer.{}", "lora_A.weight", "lora_B.weight", True),
        "peft": ("{}", "lora_A.default.weight", "lora_B.default.weight", False),
        "kohya": ("lora_unet_{}", "lora_down.weight", "lora_up.weight", True),
        "comfy": ("diffusion_model.{}", "lora_down.weight", "lora_up.weight", True),
        "bfl": ("{}", "lora_A.weight", "lora_B.weight", False),
        "xlabs": ("{}", "down.weight", "up.weight", False),
    }[layout]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (module, (n_out, n_in)) in enumerate(sorted(shapes.items())):
        stem = key.format(module.replace(".", "_") if layout == "kohya" else module)
        state[f"{stem}.{down}"] = torch.randn(rank, n_in, generator=g) * std
        state[f"{stem}.{up}"] = torch.randn(n_out, rank, generator=g) * std
        if alpha:
            state[f"{stem}.alpha"] = torch.tensor(rank * (0.5 + 0.5 * (i % 5)))
    return state


def write_lora(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save as .safetensors (contiguous copies, as trainers write them) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def write_style_lora(directory: Path, model_dir: Path, layout: str) -> Path:
    """directory/style.safetensors: a rank-4 LoRA in `layout` for the model's transformer (the
    serving tests' adapter); returns the directory."""
    from services.runtime.registry import ModelDir

    config = ModelDir(model_dir).component_config("transformer")
    write_lora(directory / "style.safetensors", flux_lora_state(config, layout, rank=4, seed=4))
    return directory


def text_encoder_lora_state(hidden: int, intermediate: int, *, rank: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """kohya `lora_te1_` keys for layer 0 of a CLIP text encoder (the DiT loader skips them)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {f"self_attn_{p}_proj": (hidden, hidden) for p in ("q", "k", "v", "out")}
    shapes |= {"mlp_fc1": (intermediate, hidden), "mlp_fc2": (hidden, intermediate)}
    state = {}
    for module, (n_out, n_in) in shapes.items():
        stem = f"lora_te1_text_model_encoder_layers_0_{module}"
        state[f"{stem}.lora_down.weight"] = torch.randn(rank, n_in, generator=g) * 0.1
        state[f"{stem}.lora_up.weight"] = torch.randn(n_out, rank, generator=g) * 0.1
        state[f"{stem}.alpha"] = torch.tensor(float(rank))
    return state
