"""Flux's prompt encoding: CLIP's pooled output plus T5's per-token hidden states.

Mirrors diffusers' FluxPipeline._get_clip_prompt_embeds / _get_t5_prompt_embeds exactly:
both tokenizers pad to max_length and truncate, no attention mask reaches either encoder (Flux
was trained that way, pad tokens included), CLIP's length is the tokenizer's model_max_length
(77) and T5's the request's max_sequence_length.

With `tp` (encoder --tp-size), T5 is sharded over the rank group (t5_parallel.py); CLIP is small
and stays whole on every rank."""

from __future__ import annotations

import logging

import torch

from services.encoder.t5_parallel import check_t5_tp, shard_t5
from services.runtime.components import load_component
from services.runtime.registry import ModelDir
from services.runtime.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)


class ClipT5PromptEncoder:
    def __init__(self, model: ModelDir, *, device: torch.device, dtype: torch.dtype, tp: TensorParallel | None = None):
        self.device = device
        self.clip_tokenizer = load_component(model, "tokenizer")
        self.clip = load_component(model, "text_encoder", dtype=dtype, device=device)
        self.t5_tokenizer = load_component(model, "tokenizer_2")
        if tp is None:
            self.t5 = load_component(model, "text_encoder_2", dtype=dtype, device=device)
        else:
            # Loaded into host memory and sharded there, then moved: the device only ever holds
            # this rank's shard (T5-XXL: ~1/T of its ~9.5 GB in bf16), which is the point of
            # encoder TP. The host briefly holds one full copy per rank while they load.
            self.t5 = shard_t5(load_component(model, "text_encoder_2", dtype=dtype, device="cpu"), tp).to(device)

    @staticmethod
    def check_tp(model: ModelDir, tp_size: int) -> None:
        check_t5_tp(model.component_config("text_encoder_2"), tp_size)

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Returns (T5 embeds [B, max_sequence_length, D], CLIP pooled [B, P], None): T5's pad
        tokens are part of Flux's input, so every row is all real."""
        clip_ids = self._tokenize(self.clip_tokenizer, prompts, self.clip_tokenizer.model_max_length)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output.to(self.clip.dtype)
        t5_ids = self._tokenize(self.t5_tokenizer, prompts, max_sequence_length)
        embeds = self.t5(t5_ids, output_hidden_states=False)[0].to(self.t5.dtype)
        return embeds, pooled, None

    def _tokenize(self, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
        ids = tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        if log.isEnabledFor(logging.WARNING):
            full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
            if full.shape[-1] > ids.shape[-1]:
                log.warning("prompt truncated to %d tokens by %s", max_length, type(tokenizer).__name__)
        return ids.to(self.device)
