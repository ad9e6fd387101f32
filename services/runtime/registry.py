"""Model registry: a diffusers-format directory -> its pipeline spec.

`model_index.json`'s `_class_name` picks the spec; component configs are read lazily and
cached. Every failure here is a one-line DitserveError naming the path or class."""

from __future__ import annotations

import json
from pathlib import Path

from services.runtime.errors import ModelNotFoundError, UnsupportedModelError
from services.runtime.pipelines import ALL_SPECS
from services.runtime.spec import PipelineSpec

_SPECS_BY_CLASS = {cls: spec for spec in ALL_SPECS for cls in spec.pipeline_classes}

# Shipped inside the package so a fresh install can generate with no download.
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "assets" / "tiny-flux"

_CONFIG_FILES = ("config.json", "scheduler_config.json")


class ModelDir:
    """A diffusers pipeline directory: model_index.json plus one folder per component."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise ModelNotFoundError(f"model path does not exist: {self.path}")
        if not self.path.is_dir():
            raise ModelNotFoundError(f"model path is not a directory: {self.path}")
        index = self.path / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(f"no model_index.json in {self.path} (not a diffusers pipeline directory)")
        try:
            self.index: dict = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelNotFoundError(f"unreadable model_index.json in {self.path}: {exc}") from None
        self.pipeline_class: str = str(self.index.get("_class_name", ""))
        self._configs: dict[str, dict] = {}

    def has_component(self, name: str) -> bool:
        """model_index.json names component `name` (absent and [null, null] both mean no)."""
        return self.index.get(name) not in (None, [None, None])

    def component_class(self, name: str) -> tuple[str, str]:
        entry = self.index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or not all(entry):
            raise ModelNotFoundError(f"{self.path}: model_index.json names no component '{name}'")
        return entry[0], entry[1]

    def component_config(self, name: str) -> dict:
        if name not in self._configs:
            self._configs[name] = self._read_config(name)
        return self._configs[name]

    def _read_config(self, name: str) -> dict:
        for fname in _CONFIG_FILES:
            f = self.path / name / fname
            if f.is_file():
                try:
                    return json.loads(f.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise ModelNotFoundError(f"unreadable {f}: {exc}") from None
        raise ModelNotFoundError(f"{self.path}: component '{name}' has no config.json")

    def tokenizer_max_length(self, name: str) -> int | None:
        """A tokenizer folder's model_max_length, if it states a real one (transformers writes a
        huge sentinel when unset)."""
        f = self.path / name / "tokenizer_config.json"
        try:
            n = json.loads(f.read_text()).get("model_max_length") if f.is_file() else None
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelNotFoundError(f"unreadable {f}: {exc}") from None
        return int(n) if isinstance(n, (int, float)) and n < 1e6 else None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent, per side: the rules diffusers' pipelines use for their VAEs."""
        vae = self.component_config("vae")
        if "block_out_channels" in vae:  # AutoencoderKL: one 2x downsample between consecutive blocks
            return 2 ** (len(vae["block_out_channels"]) - 1)
        if vae.get("scale_factor_spatial"):  # Wan's VAEs say it (8; 16 for Wan 2.2's, which patchifies)
            return int(vae["scale_factor_spatial"])
        if "temperal_downsample" in vae:  # Qwen-Image's video-shaped VAE: one spatial 2x per stage
            return 2 ** len(vae["temperal_downsample"])
        if "encoder_block_out_channels" in vae:  # DC-AE (Sana)
            return 2 ** (len(vae["encoder_block_out_channels"]) - 1)
        return 8  # diffusers' own fallback


BACKENDS = ("auto", "native", "diffusers")


def resolve(path: str | Path | None, backend: str = "auto") -> tuple[ModelDir, PipelineSpec]:
    """Open a model directory (the embedded default when `path` is None) and find its spec:
    the native family of its pipeline class, else (backend "auto" or "diffusers") the
    diffusers backend's spec for any diffusers pipeline class."""
    if backend not in BACKENDS:
        raise UnsupportedModelError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    model = ModelDir(DEFAULT_MODEL_PATH if path is None else path)
    native = _SPECS_BY_CLASS.get(model.pipeline_class)
    unserved = native.unserved(model) if native is not None else None
    if native is not None and backend != "diffusers" and unserved is None:
        return model, native
    known = ", ".join(sorted(_SPECS_BY_CLASS))
    if backend == "native":
        why = (f"the native {native.family} family does not serve {unserved}" if unserved
               else f"no native family for pipeline class '{model.pipeline_class}' (native: {known})")
        raise UnsupportedModelError(f"{model.path}: {why}; --backend diffusers serves it through diffusers")
    from services.runtime.pipelines.diffusers_any import diffusers_spec

    spec = diffusers_spec(model)
    if spec is None:
        raise UnsupportedModelError(
            f"unsupported pipeline class '{model.pipeline_class}' in {model.path}: neither a native family "
            f"({known}) nor a diffusers pipeline"
        )
    return model, spec
