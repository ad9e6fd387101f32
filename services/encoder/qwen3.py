"""Z-Image's prompt encoding: Qwen3's second-to-last hidden states over its chat template.

Mirrors diffusers' ZImagePipeline._encode_prompt: the prompt becomes one user message of the
tokenizer's chat template (generation prompt added, enable_thinking=True), the tokens are padded
to max_sequence_length and truncated there (the template counts), the language model runs with
that attention mask, and hidden_states[-2] is kept at the real tokens only. There is no pooled
embedding.

As in qwen_vl.py, each distinct prompt is encoded on its own, as diffusers encodes a
single-prompt request (padded to max_sequence_length as it is), so a request's embeddings do not
depend on the other prompts of its batch; rows come back zero-padded to the longest one, with
`lengths` saying how many tokens of each are real."""

from __future__ import annotations

import torch

from services.encoder.qwen_vl import encode_each
from services.runtime.components import load_component
from services.runtime.errors import InvalidRequestError
from services.runtime.registry import ModelDir
from services.runtime.tensor_parallel import TensorParallel


class Qwen3PromptEncoder:
    def __init__(self, model: ModelDir, *, device: torch.device, dtype: torch.dtype, tp: TensorParallel | None = None):
        if tp is not None:
            raise InvalidRequestError("encoder tensor parallelism is implemented for T5 encoders only", "tp_size")
        self.device = device
        self.tokenizer = load_component(model, "tokenizer")
        self.text_encoder = load_component(model, "text_encoder", dtype=dtype, device=device)

    @staticmethod
    def check_tp(model: ModelDir, tp_size: int) -> None:
        if tp_size > 1:
            raise InvalidRequestError(
                f"encoder --tp-size {tp_size}: tensor parallelism is implemented for T5 encoders only, not "
                "Z-Image's Qwen3", "tp_size")

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (embeds [B, L, D] zero-padded to the longest row, pooled [B, 0], lengths [B])."""
        return encode_each(prompts, lambda p: self._encode_one(p, max_sequence_length))

    def _encode_one(self, prompt: str, max_sequence_length: int) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)
        tokens = self.tokenizer([text], padding="max_length", max_length=max_sequence_length, truncation=True,
                                return_tensors="pt").to(self.device)
        mask = tokens.attention_mask.bool()
        # base_model: a Qwen3ForCausalLM's inner model gives the same hidden states without
        # running its LM head over the vocabulary (a Qwen3Model is its own base model).
        out = self.text_encoder.base_model(input_ids=tokens.input_ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-2][0][mask[0]]
