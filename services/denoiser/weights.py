"""Load a diffusers `transformer/` folder into a native model, with a strict key match.

The module is built on the meta device and the checkpoint tensors are assigned in place, so a
12B-parameter model costs no random init and no second copy in host memory."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from services.denoiser.models import FAMILIES
from services.denoiser.parallel.tp import shard_state_dict
from services.runtime.errors import ModelLoadError, UnsupportedModelError
from services.runtime.registry import ModelDir

_SINGLE = "diffusion_pytorch_model.safetensors"
_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def load_native_transformer(model: ModelDir, family: str, *, dtype: torch.dtype, device: torch.device, tp=None,
                            component: str = "transformer"):
    """`tp` (a parallel.tp.TensorParallel): build this rank's shard and load only its pieces.
    `component`: the folder, e.g. "transformer_2" (Wan 2.2 A14B's low-noise expert)."""
    fam = FAMILIES.get(family)
    if fam is None:
        raise UnsupportedModelError(f"no native denoiser for family '{family}'")
    _, class_name = model.component_class(component)
    if class_name not in fam.diffusers_classes:
        raise UnsupportedModelError(
            f"transformer class {class_name} is not a {family} transformer ({', '.join(fam.diffusers_classes)})"
        )
    config = fam.config_cls.from_dict(model.component_config(component))
    with torch.device("meta"):
        module = fam.model_cls(config, tp=tp)
    keep = _keep_in_fp32(class_name) if dtype in (torch.float16, torch.bfloat16) else ()
    state = {k: v.to(torch.float32 if keep and set(k.split(".")) & keep else dtype)
             for k, v in read_safetensors(model, component, device).items()}
    state = shard_state_dict(module, state)
    missing, unexpected = _key_diff(module, state)
    if missing or unexpected:
        raise ModelLoadError(
            f"transformer weights in {model.path} do not match the {family} architecture: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatch
        raise ModelLoadError(f"transformer weights in {model.path}: {str(exc).splitlines()[-1].strip()}") from None
    return module.eval().requires_grad_(False)


def _keep_in_fp32(class_name: str) -> set[str]:
    """Module names diffusers keeps in fp32 when it loads this class in half precision
    (`_keep_in_fp32_modules`, e.g. Wan's time embedder, modulation tables and norms): the native
    module gets the same, so its half-precision arithmetic is diffusers'."""
    import diffusers

    return set(getattr(getattr(diffusers, class_name, None), "_keep_in_fp32_modules", None) or ())


def read_safetensors(model: ModelDir, component: str, device: torch.device) -> dict[str, torch.Tensor]:
    folder = model.path / component
    if (folder / _SINGLE).is_file():
        files = [folder / _SINGLE]
    elif (folder / _INDEX).is_file():
        weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        raise ModelLoadError(f"no safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f, device=str(device)))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"cannot read {f}: {exc}") from None
    return state


def _key_diff(module: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    expected = set(module.state_dict().keys())
    return sorted(expected - state.keys()), sorted(state.keys() - expected)
