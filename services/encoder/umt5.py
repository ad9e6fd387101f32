"""Wan's prompt encoding: UMT5-XXL's last hidden state, as WanPipeline._get_t5_prompt_embeds.

The prompt is cleaned (ftfy where installed, HTML entities, whitespace), tokenized to
max_sequence_length with padding and the attention mask, and encoded with the mask; each row's
states past its real length are replaced by zeros. Every row is therefore max_sequence_length
long (512 by default) with zeros after the prompt: that is what Wan's DiT was trained on and
what it cross-attends to, so no lengths travel with the embeddings. There is no pooled vector."""

from __future__ import annotations

import html
import re

import torch

from services.encoder.single_model import SingleModelPromptEncoder, encode_each


def prompt_clean(text: str) -> str:
    """diffusers' wan prompt_clean: ftfy.fix_text (when installed), unescape twice, collapse
    whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5PromptEncoder(SingleModelPromptEncoder):
    name = "Wan's UMT5"

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Returns (embeds [B, max_sequence_length, D] zero past each prompt, pooled [B, 0], None).
        Each distinct prompt is encoded on its own, as WanPipeline encodes the prompt and the
        negative prompt: a batched call agrees with it only to rounding in half precision."""
        embeds, pooled, _ = encode_each(prompts, lambda p: self._encode_one(p, max_sequence_length))
        return embeds, pooled, None

    def _encode_one(self, prompt: str, max_sequence_length: int) -> torch.Tensor:
        tokens = self.tokenizer([prompt_clean(prompt)], padding="max_length", max_length=max_sequence_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        states = self.text_encoder(ids, mask).last_hidden_state.to(self.text_encoder.dtype)[0]
        # Zero past the prompt's length (the padded positions' states are not zero by themselves).
        return states.masked_fill(~mask[0].gt(0)[:, None], 0.0)
