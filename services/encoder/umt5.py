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
from services.runtime.components import load_component
from services.runtime.errors import InvalidRequestError
from services.runtime.registry import ModelDir


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


class WanImageToVideoPromptEncoder(UMT5PromptEncoder):
    """WanImageToVideoPipeline's encoder side: the prompts as WanPipeline's, and, for Wan 2.1
    I2V checkpoints (an `image_encoder` component, a CLIP vision model), the input image's
    tokens: the CLIP model's second-to-last hidden states over its image processor's pixels
    (the pipeline's encode_image, on the image as given, not resized). Wan 2.2 I2V has no image
    encoder: its image reaches the DiT only through the VAE's first-frame latents."""

    name = "Wan image-to-video's UMT5"
    takes_images = True

    def __init__(self, model: ModelDir, *, device: torch.device, dtype: torch.dtype, tp=None):
        super().__init__(model, device=device, dtype=dtype, tp=tp)
        self.image_encoder = self.image_processor = None
        if model.has_component("image_encoder"):
            self.image_processor = load_component(model, "image_processor")
            self.image_encoder = load_component(model, "image_encoder", dtype=dtype, device=device)

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int, images: list[torch.Tensor] = ()):
        """As UMT5PromptEncoder.encode, plus the image tokens [1, T, D] (None without a CLIP)."""
        from PIL import Image

        if len(images) != 1:
            raise InvalidRequestError(f"image: image-to-video takes one input image (the first frame), got "
                                      f"{len(images)}", "image")
        embeds, pooled, _ = super().encode(prompts, max_sequence_length)
        image_embeds = None
        if self.image_encoder is not None:
            pixels = self.image_processor(images=Image.fromarray(images[0].numpy()), return_tensors="pt")
            out = self.image_encoder(pixel_values=pixels["pixel_values"].to(self.device, self.image_encoder.dtype),
                                     output_hidden_states=True)
            image_embeds = out.hidden_states[-2]
        return embeds, pooled, None, image_embeds
