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


def compile_blocks(model: nn.Module, backend: str = "inductor", overlap_comm: bool = False,
                   variable_text: bool = False) -> None:
    """`overlap_comm` (a multi-rank replica): let inductor move independent compute between a
    collective and its wait. Measured on 2x H200, Ulysses-2, 1024x1024: 102.2 -> 83.4 ms per step;
    without it the traced all-to-alls are waited on at once and the compiled step is barely
    faster than eager (106.6 ms).

    `variable_text` (spec.variable_text: Qwen-Image and Z-Image hand the DiT each prompt's own
    length): shapes start static and torch's automatic dynamic shapes make the dimension that
    changed symbolic at the first recompile, so a replica compiles ~2 graphs per block instead of
    one per prompt length (and past MAX_SHAPES, eager). Under sequence parallelism each length
    is its own token split, which traced exchanges would bake into the graphs; such replicas
    run them outside (SequenceParallel's outside_graphs), so the same holds there.

    A multi-rank replica also keeps the blocks' own order of independent work: inductor's
    reordering for peak memory moved Flux's single-block MLP GEMM from between ulysses_post and
    ulysses_finish (where it runs beside the q/k/v exchange) to before them both."""
    if overlap_comm:
        torch._inductor.config.reorder_for_compute_comm_overlap = True
        torch._inductor.config.reorder_for_peak_memory = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, MAX_SHAPES)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_SHAPES)
    for block in repeated_blocks(model):
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=None if variable_text else False,
                                      backend=backend)


def should_compile(flag: bool | None, device: torch.device) -> bool:
    # Off by default on CPU: inductor's C++ compile of every block costs minutes there and the
    # CPU path is for tests and development.
    return device.type == "cuda" if flag is None else flag
