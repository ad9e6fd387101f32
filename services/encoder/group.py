"""One encoder replica over tp_size ranks: T5 tensor-parallel, CLIP whole on every rank.

The rank machinery (followers as processes or Ray actors, dead-rank handling, restart) is the
shared RankGroup (services/runtime/rank_group.py). Every rank encodes every request; rank 0's
embeddings are the answer (after T5's row-parallel all-reduces every rank holds the same ones)."""

from __future__ import annotations

import torch.distributed as dist

from services.runtime.config import EncoderConfig
from services.runtime.messages import EncodeRequest, EncodeResponse
from services.runtime.rank_group import RankGroup, RankSpec
from services.runtime.registry import resolve
from services.runtime.tensor_parallel import TensorParallel


def rank_stage(config: EncoderConfig):
    """One rank's EncoderStage, on an initialised process group; `config.device` is its device."""
    from services.encoder.stage import EncoderStage

    return EncoderStage(config, tp=TensorParallel(dist.group.WORLD))


class EncoderGroup(RankGroup):
    def __init__(self, config: EncoderConfig):
        from services.encoder.stage import prompt_encoder_class

        model, spec = resolve(config.model_path, config.backend)
        prompt_encoder_class(spec).check_tp(model, config.tp_size)  # before any rank starts
        super().__init__(RankSpec("encoder", rank_stage, "encode", config), config.tp_size)

    def encode(self, request: EncodeRequest) -> EncodeResponse:
        return self.call(request)
