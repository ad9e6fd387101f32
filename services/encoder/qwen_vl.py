"""Qwen-Image's prompt encoding: the last hidden states of Qwen2.5-VL over a chat template.

Mirrors diffusers' QwenImagePipeline._get_qwen_prompt_embeds / encode_prompt: the prompt goes
into the pipeline's system/user template, the language model runs with its attention mask, the
template's first 34 tokens are dropped and the rest is cut to max_sequence_length. There is no
pooled embedding.

Each distinct prompt is encoded on its own (single_model.encode_each), so its tokens are exactly
the prompt's, with no padding. Rows are then zero-padded to the longest prompt of the call and
`lengths` says how many tokens of each row are real; the router hands the DiT only real tokens
(it batches rows of equal lengths together)."""

from __future__ import annotations

import torch

from services.encoder.single_model import SingleModelPromptEncoder, encode_each

# diffusers' QwenImagePipeline constants.
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_PREFIX_TOKENS = 34
MAX_TOKENS = 1024  # the pipeline's tokenizer_max_length


class QwenVLPromptEncoder(SingleModelPromptEncoder):
    name = "Qwen-Image's Qwen2.5-VL"

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
