"""One denoiser replica spread over several ranks: cfg x ring x ulysses x tp of them.

The rank machinery (followers as processes or Ray actors, dead-rank handling, restart) is the
shared RankGroup (services/runtime/rank_group.py); this adds what is the denoiser's own: the
parallel mesh every rank builds, the layout check before any rank starts, and the warm-up,
which runs through the group so that every rank compiles the same shapes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from services.denoiser.parallel.mesh import ParallelDegrees, ParallelMesh
from services.runtime.config import DenoiserConfig
from services.runtime.errors import InvalidRequestError
from services.runtime.messages import DenoiseRequest, DenoiseResponse
from services.runtime.rank_group import RankGroup, RankSpec
from services.runtime.registry import resolve

log = logging.getLogger(__name__)


def _degrees(config: DenoiserConfig) -> ParallelDegrees:
    return ParallelDegrees(cfg=2 if config.cfg_parallel else 1, ring=config.ring_degree, ulysses=config.ulysses_degree,
                           tp=config.tp_size)


def rank_stage(config: DenoiserConfig):
    """One rank's DenoiserStage, on an initialised process group; `config.device` is its device."""
    from services.denoiser.stage import DenoiserStage

    return DenoiserStage(config, mesh=ParallelMesh(_degrees(config), config.device.split(":")[0]))


def check_degrees(config: DenoiserConfig) -> None:
    """Refuse, before any process starts, a layout the model cannot be split into."""
    model, _ = resolve(config.model_path, config.backend)
    transformer = model.component_config("transformer")
    heads = transformer.get("num_attention_heads", transformer.get("n_heads", 1))  # Z-Image: n_heads
    if heads % config.tp_size:
        raise InvalidRequestError(f"--tp-size {config.tp_size} does not divide the model's {heads} attention heads",
                                  "tp_size")


class DenoiserGroup(RankGroup):
    def __init__(self, config: DenoiserConfig):
        check_degrees(config)
        self.config = config
        super().__init__(RankSpec("denoiser", rank_stage, "denoise", config), config.world_size)

    def _start(self) -> None:
        from services.denoiser.parallel import copy_exchange
        from services.denoiser.stage import warm_up

        if self.config.ulysses_exchange == "copy-engine" and copy_exchange.set_up_here():
            # Decided here, where every rank's config comes from, so that all ranks agree.
            log.warning("this process has set up copy-engine exchanges before (a replica built again, e.g. after a "
                        "rank died): this replica's Ulysses exchanges go through NCCL, as fresh followers could not "
                        "set up symmetric memory with it (copy_exchange.set_up_here); restart the worker to get "
                        "the copy engine back")
            self.config = self.config.model_copy(update={"ulysses_exchange": "nccl"})
            self.spec = replace(self.spec, config=self.config)
        super()._start()
        warm_up(self, self.config)

    def denoise(self, request: DenoiseRequest, on_step: Callable[[int, int], None] | None = None) -> DenoiseResponse:
        return self.call(request, on_step)
