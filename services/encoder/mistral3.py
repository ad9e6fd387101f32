"""Flux.2 [dev]'s prompt encoding: Mistral Small 3's hidden states of layers 10, 20 and 30.

Mirrors diffusers' Flux2Pipeline._get_mistral_3_small_prompt_embeds: the prompt ("[IMG]" removed)
becomes the user turn after Flux.2's system message, the chat template is tokenized padded (and
truncated) to max_sequence_length, the language model runs with that attention mask, and per
token the three layers' hidden states are concatenated. Every padded token is kept, as the
pipeline hands the DiT all max_sequence_length rows, so no lengths come back.

The checkpoint's `tokenizer` component is a PixtralProcessor. Its image half (and the class
itself) needs torchvision and is unused for text, so the tokenizer inside it is loaded alone;
for text-only messages its chat template renders and tokenizes as the processor's does (the
processor delegates text to it)."""

from __future__ import annotations

import torch

from services.encoder.single_model import SingleModelPromptEncoder, encode_each
from services.runtime.registry import ModelDir

LAYERS = (10, 20, 30)  # the pipeline's text_encoder_out_layers default


class Mistral3PromptEncoder(SingleModelPromptEncoder):
    name = "Flux.2 [dev]'s Mistral 3"

    def load_tokenizer(self, model: ModelDir):
        return self.tokenizer_from(model, "tokenizer")  # the PixtralProcessor folder's tokenizer

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Returns (embeds [B, max_sequence_length, 3 x hidden], pooled [B, 0], None)."""
        embeds, pooled, _ = encode_each(prompts, lambda p: self._encode_one(p, max_sequence_length))
        return embeds, pooled, None

    def _encode_one(self, prompt: str, max_sequence_length: int) -> torch.Tensor:
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE  # the pipeline's own text

        messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                    {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}]
        tokens = self.tokenizer.apply_chat_template([messages], add_generation_prompt=False, tokenize=True,
                                                    return_dict=True, return_tensors="pt", padding="max_length",
                                                    truncation=True, max_length=max_sequence_length)
        # The inner model: the same hidden states without the LM head over the vocabulary.
        out = self.text_encoder.model(input_ids=tokens["input_ids"].to(self.device),
                                      attention_mask=tokens["attention_mask"].to(self.device),
                                      output_hidden_states=True, use_cache=False)
        return torch.cat([out.hidden_states[k][0] for k in LAYERS], dim=-1).to(self.text_encoder.dtype)
