"""Compiling the DiT, and paying for it before the first request instead of during it.

Only the repeated blocks are compiled (19 + 38 for Flux, two code objects; 60 for Qwen-Image): the whole model
would trace 57 copies of the same graph, a block takes ~15 s to compile the first time, and
the embedders around them are a rounding error. Shapes are static (`dynamic=False`): each
resolution / batch / text length gets kernels specialised to it, which is what a serving
replica sees — a handful of sizes, each many times — and why --warmup-resolutions exists.

`block.forward` is compiled rather than `block` (nn.Module.compile would compile _call_impl),
so module hooks (layerwise offload's weight copies) stay outside the graph.

The compile cache: inductor's FX-graph, AOT and autotuning caches and Triton's kernels all live
under one directory. Pointing it at persistent storage (a volume in a container) makes a
restart reuse the kernels; only dynamo's tracing (seconds) is paid again."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Distinct static shapes a block may be compiled for before torch falls back to eager for new
# ones (torch's default is 8): resolutions x batch sizes x text lengths of one replica.
MAX_SHAPES = 64


def use_compile_cache(cache_dir: Path | None) -> None:
    """Point inductor's and Triton's caches at `cache_dir` (before the first compile)."""
    if cache_dir is None:
        return
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of the model's block lists (each family's `block_lists`), in execution order."""
    return [block for name in model.block_lists for block in getattr(model, name)]


# Inductor options per order of collectives and compute (see compile_blocks).
COMM_ORDERS = {
    "program": {"reorder_for_locality": False, "reorder_for_peak_memory": False},
    "inductor": {"reorder_for_compute_comm_overlap": True},
}


def compile_blocks(model: nn.Module, backend: str = "inductor", overlap_comm: bool = False,
                   variable_text: bool = False, comm_order: str = "inductor") -> None:
    """`overlap_comm` (a multi-rank replica), by `comm_order`:
    - "program", for models whose layers place their collectives' waits after the work that can
      hide them (attention.Overlap; a model says so with `comm_order = "program"`): inductor must
      keep that order, and its locality and peak-memory reorderings would not (they moved Flux's
      MLP GEMM past the wait that followed it). Flux, Ulysses-2, 1024x1024, 2x H100, same run:
      85.3 ms per step against 95.2-97.5 ms for "inductor".
    - "inductor": inductor's compute/communication reordering places the waits as late as the
      data allows. Measured on 2x H200 with Flux before the program order existed: 102.2 ->
      83.4 ms per step; without it the traced all-to-alls were waited on at once.

    `variable_text` (spec.variable_text: Qwen-Image and Z-Image hand the DiT each prompt's own
    length): shapes start static and torch's automatic dynamic shapes make the dimension that
    changed symbolic at the first recompile, so a replica compiles ~2 graphs per block instead of
    one per prompt length (and past MAX_SHAPES, eager). Under sequence parallelism each length
    is still its own SequenceParallel object, which the graphs guard on: those recompile per
    length (up to MAX_SHAPES)."""
    if comm_order not in COMM_ORDERS:
        raise ValueError(f"comm_order must be one of {sorted(COMM_ORDERS)}, got {comm_order!r}")
    options = COMM_ORDERS[comm_order] if overlap_comm and backend == "inductor" else None
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, MAX_SHAPES)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_SHAPES)
    for block in repeated_blocks(model):
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=None if variable_text else False,
                                      backend=backend, options=options)


def should_compile(flag: bool | None, device: torch.device) -> bool:
    # Off by default on CPU: inductor's C++ compile of every block costs minutes there and the
    # CPU path is for tests and development.
    return device.type == "cuda" if flag is None else flag
