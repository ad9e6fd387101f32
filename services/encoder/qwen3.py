"""Z-Image's prompt encoding: Qwen3's second-to-last hidden states over its chat template.

Mirrors diffusers' ZImagePipeline._encode_prompt: the prompt becomes one user message of the
tokenizer's chat template (generation prompt added, enable_thinking=True), the tokens are padded
to max_sequence_length and truncated there (the template counts), the language model runs with
that attention mask, and hidden_states[-2] is kept at the real tokens only. There is no pooled
embedding.

Each distinct prompt is encoded on its own (single_model.encode_each), padded to
max_sequence_length as the pipeline pads it; rows come back zero-padded to the longest one, with
`lengths` saying how many tokens of each are real.

Flux.2 [klein] encodes with the same Qwen3 and template differently (Flux2KleinPromptEncoder,
at the end): intermediate layers, every padded token kept."""

from __future__ import annotations

import torch

from services.encoder.single_model import SingleModelPromptEncoder, encode_each


class Qwen3PromptEncoder(SingleModelPromptEncoder):
    name = "Z-Image's Qwen3"

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


class Flux2KleinPromptEncoder(Qwen3PromptEncoder):
    """Flux.2 [klein]'s prompt encoding (Flux2KleinPipeline._get_qwen3_prompt_embeds): the same
    chat template with enable_thinking=False, padded (and truncated) to max_sequence_length, and
    per token the hidden states of layers 9, 18 and 27 concatenated. Every padded token is kept:
    the pipeline hands the DiT all max_sequence_length rows (the mask acts only inside Qwen3), so
    rows are equally long and no `lengths` come back. Each distinct prompt is encoded alone, as
    the pipeline encodes a one-prompt request."""

    name = "Flux.2 [klein]'s Qwen3"
    LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers default

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Returns (embeds [B, max_sequence_length, 3 x hidden], pooled [B, 0], None)."""
        embeds, pooled, _ = encode_each(prompts, lambda p: self._encode_one(p, max_sequence_length))
        return embeds, pooled, None

    def _encode_one(self, prompt: str, max_sequence_length: int) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        tokens = self.tokenizer(text, padding="max_length", max_length=max_sequence_length, truncation=True,
                                return_tensors="pt").to(self.device)
        out = self.text_encoder.base_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                           output_hidden_states=True, use_cache=False)
        # The pipeline's stack on dim 1 + permute + reshape is this concatenation, per token.
        return torch.cat([out.hidden_states[k][0] for k in self.LAYERS], dim=-1).to(self.text_encoder.dtype)
