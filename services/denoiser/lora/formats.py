"""Flux LoRA files in the common layouts -> the one internal layout of adapter.py.

Told apart key by key, so mixed files work too:
  diffusers / PEFT  [transformer.]<diffusers module>.lora_A[.default].weight, .lora_B..., [.alpha]
  kohya sd-scripts  lora_unet_<BFL module, dots as underscores>.lora_down.weight, .lora_up..., .alpha
  BFL               <BFL module>.lora_A.weight, .lora_B.weight
  XLabs             double_blocks.N.processor.qkv_lora1.down.weight, .up.weight (never an alpha)
  ComfyUI           any of these under diffusion_model. (fal: base_model.model.)
BFL modules fuse what diffusers keeps apart (qkv; single blocks' linear1 = q | k | v | mlp): the
down factor is shared by the parts and the up factor split by rows, as diffusers converts them.
Scale is alpha / rank wherever the file has an alpha, else 1. Text-encoder weights are skipped
with a warning (the encoder stage does not take adapters); anything else unknown is an error."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from services.denoiser.lora.adapter import LoraAdapter, LoraWeight
from services.denoiser.models.flux import FluxConfig, FluxTransformer
from services.runtime.errors import InvalidRequestError

log = logging.getLogger(__name__)

_KEY = re.compile(r"(.+)\.(lora_A|lora_B|lora_down|lora_up|down|up)(?:\.default)?\.weight")
_DOWN = {"lora_A", "lora_down", "down"}
# Stripped (repeatedly) before naming a module: PEFT/diffusers, ComfyUI, fal, kohya.
_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.", "lora_unet_")
_TEXT_ENCODER = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "text_encoders.")
_DIFFUSERS_ROOTS = (
    "transformer_blocks.",
    "single_transformer_blocks.",
    "time_text_embed.",
    "norm_out.",
    "x_embedder",
    "context_embedder",
    "proj_out",
)

# BFL module (dots as underscores, as kohya spells it) -> the diffusers modules its output rows
# feed, in row order. Fused modules split rows evenly, except linear1: [q | k | v | mlp] =
# [d, d, d, 4d] (MLP ratio 4), hence the heights below.
_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_DOUBLE = {
    "img_attn_qkv": _QKV,
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": _ADD_QKV,
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
    # XLabs adds LoRAs beside BFL's attention layers: lora1 = image stream, lora2 = text stream.
    "processor_qkv_lora1": _QKV,
    "processor_proj_lora1": ("attn.to_out.0",),
    "processor_qkv_lora2": _ADD_QKV,
    "processor_proj_lora2": ("attn.to_add_out",),
}
_SINGLE = {
    "linear1": (*_QKV, "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
    "processor_qkv_lora": _QKV,  # XLabs: attention qkv only (3d rows), not all of linear1
    "processor_proj_lora": ("proj_out",),
}
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
# BFL's final modulation emits (shift, scale); diffusers' norm_out.linear emits (scale, shift).
_SWAPPED = "final_layer_adaLN_modulation_1"
_HEIGHTS = (1, 1, 1, 4)  # relative row heights of a module's parts: the first len(parts) of these
_BLOCK = re.compile(r"(double_blocks|single_blocks)_(\d+)_(.+)")


def module_shapes(model_cls: type, config) -> dict[str, tuple[int, int]]:
    """[out, in] of every linear of the (unsharded) native DiT: what an adapter may target."""
    with torch.device("meta"):
        model = model_cls(config)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def flux_module_shapes(config: FluxConfig) -> dict[str, tuple[int, int]]:
    return module_shapes(FluxTransformer, config)


def read_lora(
    path: str | Path,
    name: str,
    model_config: FluxConfig | None = None,
    module_shapes: dict[str, tuple[int, int]] | None = None,
) -> LoraAdapter:
    """Read a .safetensors LoRA on CPU; checked against the model when its config or shapes are given."""
    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            state.update(_metadata_alphas(state, f.metadata() or {}))
    except (OSError, SafetensorError, ValueError, TypeError, re.error) as exc:  # missing, truncated, bad header
        raise InvalidRequestError(f"LoRA '{name}': cannot read {path}: {exc}", "lora") from None
    if module_shapes is None and model_config is not None:
        module_shapes = flux_module_shapes(model_config)
    return convert_lora(state, name, module_shapes)


def convert_lora(
    state: dict[str, torch.Tensor], name: str, module_shapes: dict[str, tuple[int, int]] | None = None
) -> LoraAdapter:
    """Any layout above -> LoraAdapter; `module_shapes` (native path -> (out, in)) checks the fit."""

    def fail(msg: str) -> NoReturn:
        raise InvalidRequestError(f"LoRA '{name}': {msg}", "lora")

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    skipped, unknown = [], []
    for key, value in state.items():
        if key.startswith(_TEXT_ENCODER):
            skipped.append(key)
        elif key.endswith(".alpha"):
            pairs.setdefault(key.removesuffix(".alpha"), {})["alpha"] = value
        elif m := _KEY.fullmatch(key):
            pairs.setdefault(m[1], {})["down" if m[2] in _DOWN else "up"] = value
        else:
            unknown.append(key)

    weights: dict[str, LoraWeight] = {}
    for stem, p in pairs.items():
        if "down" not in p and "up" not in p:
            continue  # an alpha whose weights were pruned changes nothing
        parts, swapped = _native_modules(stem, module_shapes)
        if parts is None:
            unknown.append(stem)
            continue
        if "down" not in p or "up" not in p:
            fail(f"{stem} has a {'down' if 'down' in p else 'up'} weight but no {'up' if 'down' in p else 'down'}")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            fail(f"{stem}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a low-rank pair")
        scale = float(p["alpha"]) / down.shape[0] if "alpha" in p else 1.0
        heights = _HEIGHTS[: len(parts)]
        if up.shape[0] % (sum(heights) * (2 if swapped else 1)):
            fail(f"{stem}: {up.shape[0]} output rows do not split into {', '.join(parts)}")
        if swapped:
            shift, scale_rows = up.chunk(2)
            up = torch.cat([scale_rows, shift])
        unit = up.shape[0] // sum(heights)
        for path, rows in zip(parts, up.split([h * unit for h in heights])):
            if path in weights:
                fail(f"{path} is targeted twice (by {stem} and another key)")
            weights[path] = LoraWeight(down, rows, scale)

    if unknown:
        fail(
            f"unrecognised keys, not a LoRA layout we read: {', '.join(sorted(unknown)[:3])}"
            f"{'...' if len(unknown) > 3 else ''}"
        )
    if not weights:
        fail("targets nothing in the transformer" + (" (text-encoder weights only)" if skipped else ""))
    if skipped:
        log.warning("LoRA '%s': skipped %d text-encoder weights (e.g. %s)", name, len(skipped), skipped[0])
    if module_shapes is not None:
        for path, w in weights.items():
            if path not in module_shapes:
                fail(f"targets {path}, which this model does not have")
            if (w.up.shape[0], w.down.shape[1]) != tuple(module_shapes[path]):
                fail(f"{path} is {tuple(module_shapes[path])} but the LoRA gives {(w.up.shape[0], w.down.shape[1])}")
    return LoraAdapter(name, weights)


def _native_modules(stem: str, module_shapes: dict | None = None) -> tuple[tuple[str, ...] | None, bool]:
    """The diffusers module paths a file's module name feeds (None: not a DiT module), and
    whether its output halves are BFL's (shift, scale) order. A name that is a module of the
    model (`module_shapes`) is taken as a diffusers path first: Qwen-Image's diffusers names
    `img_in` / `txt_in` are also BFL names of Flux modules."""
    while stem.startswith(_PREFIXES):
        stem = stem.removeprefix(next(p for p in _PREFIXES if stem.startswith(p)))
    if stem.startswith(_DIFFUSERS_ROOTS) or (module_shapes is not None and stem in module_shapes):
        return (stem,), False
    flat = stem.replace(".", "_")
    if m := _BLOCK.fullmatch(flat):
        kind, i, module = m.groups()
        table, native = (
            (_DOUBLE, "transformer_blocks") if kind == "double_blocks" else (_SINGLE, "single_transformer_blocks")
        )
        parts = table.get(module)
        return (tuple(f"{native}.{i}.{p}" for p in parts) if parts else None), False
    return ((_TOP[flat],) if flat in _TOP else None), flat == _SWAPPED


def _metadata_alphas(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """diffusers' training scripts write alphas into the safetensors header (peft's LoraConfig:
    lora_alpha, alpha_pattern), not as .alpha keys; make them .alpha keys of the PEFT modules."""
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    config = {k.removeprefix("transformer."): v for k, v in config.items()}  # a pipeline's file prefixes fields
    if "lora_alpha" not in config:
        return {}
    patterns = config.get("alpha_pattern") or {}
    alphas = {}
    for key in state:
        m = _KEY.fullmatch(key)
        if m is None or m[2] != "lora_A" or key.startswith(_TEXT_ENCODER) or f"{m[1]}.alpha" in state:
            continue
        module = m[1].removeprefix("transformer.")
        # peft's own pattern rule (peft.utils.other.get_pattern_key): the key matches a name suffix.
        hit = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)
        alphas[f"{m[1]}.alpha"] = torch.tensor(float(patterns[hit] if hit else config["lora_alpha"]))
    return alphas
