"""Loading a checkpoint component with the library class its model_index.json names.

Text encoders, tokenizers, VAEs and schedulers come from transformers / diffusers as they are;
only the DiT has a native implementation (services/denoiser/models)."""

from __future__ import annotations

import importlib
import logging

import torch

from services.runtime.errors import ModelLoadError
from services.runtime.registry import ModelDir

_LIBRARIES = ("transformers", "diffusers")


def load_component(model: ModelDir, name: str, *, dtype: torch.dtype | None = None, device=None):
    """Load `name` (e.g. "text_encoder_2") from `model`; modules are cast, moved and set to eval."""
    library, class_name = model.component_class(name)
    if library not in _LIBRARIES:
        raise ModelLoadError(f"component '{name}' comes from unsupported library '{library}'")
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except AttributeError:
        raise ModelLoadError(f"component '{name}': {library} has no class {class_name}") from None
    is_module = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    kwargs = {"torch_dtype": dtype} if is_module and dtype is not None else {}
    try:
        obj = _quiet_from_pretrained(cls, model.path / name, **kwargs)
    except Exception as exc:  # the libraries raise many types (OSError, ValueError, KeyError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"failed to load component '{name}' ({class_name}) from {model.path}: {first}") from exc
    if is_module:
        obj = obj.to(device).eval().requires_grad_(False)
    return obj


def _quiet_from_pretrained(cls, path, **kwargs):
    # Both libraries print progress bars and advisory warnings on every load; a serving
    # process logs its own load line instead.
    import diffusers
    import transformers

    tlevel, dlevel = transformers.logging.get_verbosity(), diffusers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    try:
        return cls.from_pretrained(path, **kwargs)
    finally:
        transformers.logging.set_verbosity(tlevel)
        diffusers.logging.set_verbosity(dlevel)
        logging.getLogger(__name__).debug("loaded %s from %s", cls.__name__, path)
