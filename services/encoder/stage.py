"""The encoder stage: one object per worker, `encode(EncodeRequest) -> EncodeResponse`.

With an encoder tp_size > 1 `EncoderStage(config)` returns an EncoderGroup (group.py): the same
interface, backed by that many ranks."""

from __future__ import annotations

import torch

from services.encoder.clip_t5 import ClipT5PromptEncoder
from services.encoder.mistral3 import Mistral3PromptEncoder
from services.encoder.qwen3 import Flux2KleinPromptEncoder, Qwen3PromptEncoder
from services.encoder.qwen_vl import QwenVLEditPlusPromptEncoder, QwenVLEditPromptEncoder, QwenVLPromptEncoder
from services.encoder.umt5 import UMT5PromptEncoder, WanImageToVideoPromptEncoder
from services.runtime.config import EncoderConfig, StageConfig
from services.runtime.device import default_dtype, measure, parse_device, parse_dtype
from services.runtime.errors import InvalidRequestError, UnsupportedModelError
from services.runtime.messages import EncodeRequest, EncodeResponse
from services.runtime.registry import resolve
from services.runtime.spec import PipelineSpec
from services.runtime.tensor_parallel import TensorParallel

# Prompt-encoder kinds a pipeline spec may name. Each takes (model, device=, dtype=, tp=), has
# check_tp(model, tp_size), which refuses a degree the model cannot be split into, and
# encode(prompts, max_sequence_length) -> (embeds, pooled, lengths or None); those with
# `takes_images` (edit and image-to-video models') take encode(prompts, max_sequence_length, images),
# need images, and return (embeds, pooled, lengths or None, image tokens or None).
PROMPT_ENCODERS = {"clip_t5": ClipT5PromptEncoder, "qwen_vl": QwenVLPromptEncoder, "qwen3": Qwen3PromptEncoder,
                   "umt5": UMT5PromptEncoder, "qwen3_flux2_klein": Flux2KleinPromptEncoder,
                   "qwen_vl_edit": QwenVLEditPromptEncoder, "qwen_vl_edit_plus": QwenVLEditPlusPromptEncoder,
                   "umt5_i2v": WanImageToVideoPromptEncoder, "mistral3_flux2": Mistral3PromptEncoder}


def prompt_encoder_class(spec: PipelineSpec):
    if spec.whole_pipeline:
        raise UnsupportedModelError(f"{spec.family} runs whole in the denoiser worker: it has no encoder worker")
    impl = PROMPT_ENCODERS.get(spec.prompt_encoder)
    if impl is None:
        raise UnsupportedModelError(f"no prompt encoder '{spec.prompt_encoder}' for {spec.family}")
    return impl


class EncoderStage:
    def __new__(cls, config: StageConfig, tp: TensorParallel | None = None):
        if tp is None and isinstance(config, EncoderConfig) and config.tp_size > 1:
            from services.encoder.group import EncoderGroup

            return EncoderGroup(config)
        return super().__new__(cls)

    def __init__(self, config: StageConfig, tp: TensorParallel | None = None):
        """`tp`: this rank's tensor-parallel group, on each rank of an EncoderGroup."""
        self.model, self.spec = resolve(config.model_path, config.backend)
        impl = prompt_encoder_class(self.spec)
        self.device = parse_device(config.device)
        self.dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(self.device)
        self.encoder = impl(self.model, device=self.device, dtype=self.dtype, tp=tp)
        # One encode before the first request: on a GPU the first call pays for CUDA kernels'
        # loading and cuBLAS's set-up (~0.3 s), which is not the first user's to wait for. In a
        # group every rank runs this same call while it starts, so their collectives pair up.
        # (An edit model's encoder warms up with a small grey image.)
        images = [torch.full((64, 64, 3), 128, dtype=torch.uint8)] if self.takes_images else []
        self.encode(EncodeRequest(prompts=[""], max_sequence_length=self.spec.defaults(self.model).max_sequence_length,
                                  images=images))

    @property
    def takes_images(self) -> bool:
        return getattr(self.encoder, "takes_images", False)

    def encode(self, request: EncodeRequest) -> EncodeResponse:
        if request.images and not self.takes_images:
            raise InvalidRequestError(f"image: {self.spec.family}'s prompt encoder takes no images", "image")
        image_embeds = None
        with measure(self.device) as metrics:
            if self.takes_images:
                embeds, pooled, lengths, image_embeds = self.encoder.encode(
                    request.prompts, request.max_sequence_length, request.images)
            else:
                embeds, pooled, lengths = self.encoder.encode(request.prompts, request.max_sequence_length)
        return EncodeResponse(prompt_embeds=embeds, pooled_prompt_embeds=pooled, metrics=metrics,
                              prompt_lengths=lengths, image_embeds=image_embeds)
