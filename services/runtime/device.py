"""Device and dtype parsing, and per-stage peak-memory measurement."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from services.runtime.errors import InvalidRequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidRequestError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})", "dtype") from None


def parse_device(name: str | None) -> torch.device:
    """`None` means the best available: cuda if present, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidRequestError(f"unknown device '{name}'", "device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' requested but no CUDA device is available", "device")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 is what Flux was trained in and halves memory on GPU; CPUs run fp32 far faster.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class StageMeasurement:
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    # A multi-rank stage: every rank's peak (rank 0 first); empty for a single rank.
    peak_memory_by_rank: list[int] = field(default_factory=list)
    # Denoiser: adapter files read / found loaded during the call.
    lora_loads: int = 0
    lora_hits: int = 0


class measure:
    """Context manager: wall time and peak memory of one stage call.

    On CUDA the allocator's peak is reset on entry and read on exit, so the number is this call's
    own. On CPU there is no resettable counter: it is the process's peak resident set so far,
    which for a worker process running one stage is the stage's footprint.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.result = StageMeasurement()

    def __enter__(self) -> StageMeasurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.result.peak_memory_bytes = rss if sys.platform == "darwin" else rss * 1024
        self.result.seconds = time.perf_counter() - self._t0
