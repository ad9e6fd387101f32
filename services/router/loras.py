"""LoRA references of requests -> checked adapter files (CPU bookkeeping, before batching).

Every adapter a request names is resolved and checked here, once per file version, before the
request joins a batch: a bad adapter fails only the request that names it (400, the adapter
named), never the batch it would have shared. The denoiser then loads files already known to
parse and to fit the model.

Paths: with a LoRA directory, a request path is taken relative to it and whatever it resolves
to (after `..` and symlinks) must stay inside it; without one, a server refuses request paths
(registered names only) and `ditserve generate` reads the files its user gives it.

Registered names and the default set (the SGLang-Diffusion style endpoints set_lora / list_loras
/ merge / unmerge) are per router; under Ray Serve the router pool has one replica by default."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from services.runtime.config import LoraRef
from services.runtime.errors import InvalidRequestError
from services.runtime.messages import AdapterRef

_CHECKED_MAX = 256  # file versions remembered as valid


class LoraResolver:
    def __init__(self, check, lora_dir: Path | None = None, allow_any_path: bool = False):
        """`check(path, name)` parses an adapter file and raises InvalidRequestError if it does
        not fit the model (services.denoiser.lora.formats.read_lora with the model's shapes)."""
        self.check = check
        self.lora_dir = Path(lora_dir).resolve() if lora_dir is not None else None
        self.allow_any_path = allow_any_path
        self.registered: dict[str, AdapterRef] = {}
        # The set last given to set_lora, and whether requests without `lora` get it ("merged").
        self.default_set: list[AdapterRef] = []
        self.default_on = True
        self._checked: OrderedDict[tuple, None] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def default(self) -> list[AdapterRef]:
        return list(self.default_set) if self.default_on else []

    def resolve(self, refs: list[LoraRef]) -> list[AdapterRef]:
        """A request's adapters in order; no refs: the server's default set."""
        if not refs:
            return self.default
        return [self._resolve_one(ref) for ref in refs]

    def register(self, name: str, path: str, strength: float = 1.0) -> AdapterRef:
        ref = self._resolve_one(LoraRef(name=name, path=path, strength=strength))
        self.registered[name] = AdapterRef(name, ref.path, 1.0)
        return ref

    def _resolve_one(self, ref: LoraRef) -> AdapterRef:
        if ref.path is None:
            known = self.registered.get(ref.name)
            if known is None:
                names = ", ".join(sorted(self.registered)) or "none"
                raise InvalidRequestError(f"unknown LoRA '{ref.name}' (registered: {names}); give a path", "lora")
            path = Path(known.path)
        else:
            path = self._safe_path(ref.name, ref.path)
        self._check_once(path, ref.name)
        return AdapterRef(ref.name, str(path), ref.strength)

    def _safe_path(self, name: str, raw: str) -> Path:
        if self.lora_dir is None and not self.allow_any_path:
            raise InvalidRequestError(
                f"LoRA '{name}': this server reads LoRA files only from its --lora-dir, and none is set", "lora"
            )
        path = Path(raw)
        if self.lora_dir is not None and not path.is_absolute():
            path = self.lora_dir / path
        # Containment first, on the path with every existing symlink followed, so a refused
        # path reveals nothing about what exists outside the directory.
        real = path.resolve()
        if self.lora_dir is not None and not real.is_relative_to(self.lora_dir):
            raise InvalidRequestError(f"LoRA '{name}': '{raw}' is outside the LoRA directory", "lora")
        if not real.is_file():
            raise InvalidRequestError(f"LoRA '{name}': no such file '{raw}'", "lora")
        return real

    def _check_once(self, path: Path, name: str) -> None:
        try:
            st = path.stat()
        except OSError as exc:
            raise InvalidRequestError(f"LoRA '{name}': cannot read '{path.name}': {exc.strerror}", "lora") from None
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._checked:
                self._checked.move_to_end(key)
                return
        self.check(path, name)
        with self._lock:
            self._checked[key] = None
            while len(self._checked) > _CHECKED_MAX:
                self._checked.popitem(last=False)


def lora_resolver(model, spec, lora_dir: Path | None, allow_any_path: bool = False) -> LoraResolver | None:
    """A resolver whose check parses a file and matches it against `model`'s DiT shapes (from
    its config: no weights are read); None for a family without per-request LoRA."""
    if "lora" not in spec.features:
        return None
    from services.denoiser.lora.formats import module_shapes, read_lora
    from services.denoiser.models import FAMILIES

    family = FAMILIES[spec.denoiser]
    shapes = module_shapes(family.model_cls, family.config_cls.from_dict(model.component_config("transformer")))
    return LoraResolver(lambda path, name: read_lora(path, name, module_shapes=shapes), lora_dir, allow_any_path)
