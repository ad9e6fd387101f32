"""The encoder stage: one object per worker, `encode(EncodeRequest) -> EncodeResponse`."""

from __future__ import annotations

from services.encoder.clip_t5 import ClipT5PromptEncoder
from services.runtime.config import StageConfig
from services.runtime.device import default_dtype, measure, parse_device, parse_dtype
from services.runtime.errors import UnsupportedModelError
from services.runtime.messages import EncodeRequest, EncodeResponse
from services.runtime.registry import resolve

# Prompt-encoder kinds a pipeline spec may name.
PROMPT_ENCODERS = {"clip_t5": ClipT5PromptEncoder}


class EncoderStage:
    def __init__(self, config: StageConfig):
        self.model, self.spec = resolve(config.model_path, config.backend)
        if self.spec.whole_pipeline:
            raise UnsupportedModelError(f"{self.spec.family} runs whole in the denoiser worker: it has no encoder worker")
        self.device = parse_device(config.device)
        self.dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(self.device)
        impl = PROMPT_ENCODERS.get(self.spec.prompt_encoder)
        if impl is None:
            raise UnsupportedModelError(f"no prompt encoder '{self.spec.prompt_encoder}' for {self.spec.family}")
        self.encoder = impl(self.model, device=self.device, dtype=self.dtype)
        # One encode before the first request: on a GPU the first call pays for CUDA kernels'
        # loading and cuBLAS's set-up (~0.3 s), which is not the first user's to wait for.
        self.encode(EncodeRequest(prompts=[""], max_sequence_length=self.spec.defaults(self.model).max_sequence_length))

    def encode(self, request: EncodeRequest) -> EncodeResponse:
        with measure(self.device) as metrics:
            embeds, pooled = self.encoder.encode(request.prompts, request.max_sequence_length)
        return EncodeResponse(prompt_embeds=embeds, pooled_prompt_embeds=pooled, metrics=metrics)
