"""The adapters a denoiser replica keeps loaded: an LRU of at most `max_loras` files, keyed by
path and file version (a file rewritten in place is read again), held in host memory; the
per-batch device tensors are built by apply.py."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from services.denoiser.lora.adapter import LoraAdapter
from services.denoiser.lora.formats import read_lora
from services.runtime.errors import InvalidRequestError
from services.runtime.messages import AdapterRef


class AdapterStore:
    def __init__(self, shapes: dict[str, tuple[int, int]], max_loras: int):
        self.shapes, self.max_loras = shapes, max_loras
        self._loaded: OrderedDict[tuple, LoraAdapter] = OrderedDict()
        self.loads = self.hits = 0

    def get(self, ref: AdapterRef) -> LoraAdapter:
        try:
            st = Path(ref.path).stat()
        except OSError as exc:
            raise InvalidRequestError(f"LoRA '{ref.name}': cannot read it: {exc.strerror}", "lora") from None
        key = (ref.path, st.st_mtime_ns, st.st_size)
        adapter = self._loaded.get(key)
        if adapter is not None:
            self._loaded.move_to_end(key)
            self.hits += 1
            return adapter
        adapter = read_lora(ref.path, ref.name, module_shapes=self.shapes)
        adapter.key = f"{ref.path}@{st.st_mtime_ns}"  # merged sets are compared by file version
        self.loads += 1
        self._loaded[key] = adapter
        while len(self._loaded) > self.max_loras:
            self._loaded.popitem(last=False)
        return adapter
