"""Qwen-Image's prompt encoding: the last hidden states of Qwen2.5-VL over a chat template.

Mirrors diffusers' QwenImagePipeline._get_qwen_prompt_embeds / encode_prompt: the prompt goes
into the pipeline's system/user template, the language model runs with its attention mask, the
template's first 34 tokens are dropped and the rest is cut to max_sequence_length. There is no
pooled embedding.

Each distinct prompt is encoded on its own, as diffusers encodes a single-prompt request: its
tokens are exactly the prompt's, with no padding, so a request's embeddings do not depend on the
other prompts of its batch (padded batch encoding agrees only to rounding). Rows are then
zero-padded to the longest prompt of the call and `lengths` says how many tokens of each row are
real; the router hands the DiT only real tokens (it batches rows of equal lengths together).
The cost is one language-model call per distinct prompt, small next to the DiT's steps."""

from __future__ import annotations

import torch

from services.runtime.components import load_component
from services.runtime.errors import InvalidRequestError
from services.runtime.registry import ModelDir
from services.runtime.tensor_parallel import TensorParallel

# diffusers' QwenImagePipeline constants.
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_PREFIX_TOKENS = 34
MAX_TOKENS = 1024  # the pipeline's tokenizer_max_length


def encode_each(prompts: list[str], encode_one) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each distinct prompt through encode_one(prompt) -> [L_i, D] once; returns (embeds [B, L, D]
    zero-padded to the longest row, an empty pooled [B, 0], lengths [B])."""
    distinct = {p: encode_one(p) for p in dict.fromkeys(prompts)}
    rows = [distinct[p] for p in prompts]
    longest = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int64)
    return embeds, embeds.new_zeros(len(prompts), 0), lengths


class QwenVLPromptEncoder:
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
                "Qwen-Image's Qwen2.5-VL", "tp_size")

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (embeds [B, L, D] zero-padded to the longest row, pooled [B, 0], lengths [B])."""
        return encode_each(prompts, lambda p: self._encode_one(p)[:max_sequence_length])

    def _encode_one(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer([TEMPLATE.format(prompt)], max_length=MAX_TOKENS + TEMPLATE_PREFIX_TOKENS,
                                padding=True, truncation=True, return_tensors="pt").to(self.device)
        # The whole Qwen2_5_VLForConditionalGeneration, as diffusers calls it, would also run the
        # LM head over a ~152k vocabulary for nothing: its last hidden state is the inner model's.
        out = self.text_encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        hidden = out.last_hidden_state[0][tokens.attention_mask[0].bool()]
        return hidden[TEMPLATE_PREFIX_TOKENS:].to(self.text_encoder.dtype)
