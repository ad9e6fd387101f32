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
from services.runtime.errors import InvalidRequestError, ModelLoadError
from services.runtime.spec import calculate_dimensions

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


# --- Qwen-Image-Edit / Edit-Plus: the prompt with its input images ---------------------------

# diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline constants.
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_TEMPLATE_PREFIX_TOKENS = 64
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
# The area the vision tower sees each input image at: Edit shows it at the VAE's ~1024x1024,
# Edit-Plus at ~384x384 (CONDITION_IMAGE_SIZE), each in the image's own aspect ratio.
EDIT_CONDITION_AREA = 1024 * 1024
EDIT_PLUS_CONDITION_AREA = 384 * 384


class QwenVLEditPromptEncoder(QwenVLPromptEncoder):
    """QwenImageEditPipeline's prompt encoding: the input image goes into the chat template's
    user turn, Qwen2.5-VL's vision tower turns it into tokens, and the last hidden states of
    every token after the system prompt (image tokens included) are the DiT's text tokens.

    The pipeline's `processor` (Qwen2VLProcessor) is used in its two parts, loaded from the
    checkpoint's processor/ folder: its tokenizer, and its image processor (the backend
    transformers picks by default, as Qwen2VLProcessor.from_pretrained does). Expanding each
    image slot to its grid's token count is the processor's replace_image_token. (The
    processor class itself also needs a video processor, i.e. torchvision, which is not used.)"""

    name = "Qwen-Image-Edit's Qwen2.5-VL"
    takes_images = True
    condition_area = EDIT_CONDITION_AREA

    def __init__(self, model, *, device, dtype, tp=None):
        from diffusers.image_processor import VaeImageProcessor
        from transformers import AutoImageProcessor

        super().__init__(model, device=device, dtype=dtype, tp=tp)
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(model.path / "processor")
        except Exception as exc:  # the libraries raise many types
            raise ModelLoadError(f"failed to load the image processor of {model.path}: {exc}") from exc
        self.merge = self.image_processor.merge_size ** 2
        self.resizer = VaeImageProcessor()  # the pipelines' resize (Lanczos), for the condition images

    def load_tokenizer(self, model):
        return self.tokenizer_from(model, "processor")  # the pipeline tokenizes with its processor's

    def text(self, prompt: str, count: int) -> str:
        if count != 1:
            raise InvalidRequestError(f"image: Qwen-Image-Edit takes one input image, got {count}", "image")
        return EDIT_TEMPLATE.format(IMAGE_SLOT + prompt)

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_sequence_length: int, images: list[torch.Tensor] = ()):
        """As QwenVLPromptEncoder.encode, each prompt with every image of `images` (uint8
        [H, W, 3]), and no separate image tokens (None). No max_sequence_length cut: the edit
        pipelines apply none."""
        from PIL import Image

        if not images:
            raise InvalidRequestError(f"image: {self.name} encodes a prompt with its input image(s)", "image")
        for p in prompts:
            if IMAGE_PAD in p or "<|vision_start|>" in p:
                raise InvalidRequestError("prompt: may not contain Qwen2.5-VL's vision tokens", "prompt")
        pils = [Image.fromarray(t.numpy()) for t in images]
        condition = [self.resizer.resize(im, *reversed(calculate_dimensions(self.condition_area, im.width, im.height)))
                     for im in pils]
        vision = self.image_processor(images=condition, return_tensors="pt")
        # Qwen2VLProcessor.replace_image_token: one pad per merged patch of that image's grid.
        pads = [IMAGE_PAD * int(grid.prod() // self.merge) for grid in vision["image_grid_thw"]]
        embeds, pooled, lengths = encode_each(
            prompts, lambda p: self._encode_with_images(self.text(p, len(pils)), pads, vision))
        return embeds, pooled, lengths, None  # (the images reach the DiT as tokens of the prompt)

    def _encode_with_images(self, text: str, pads: list[str], vision) -> torch.Tensor:
        pieces = text.split(IMAGE_PAD)
        text = "".join(piece + (pads[i] if i < len(pads) else "") for i, piece in enumerate(pieces))
        tokens = self.tokenizer([text], padding=True, return_tensors="pt").to(self.device)
        out = self.text_encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                      pixel_values=vision["pixel_values"].to(self.device),
                                      image_grid_thw=vision["image_grid_thw"].to(self.device))
        hidden = out.last_hidden_state[0][tokens.attention_mask[0].bool()]
        return hidden[EDIT_TEMPLATE_PREFIX_TOKENS:].to(self.text_encoder.dtype)


class QwenVLEditPlusPromptEncoder(QwenVLEditPromptEncoder):
    """QwenImageEditPlusPipeline's: every input image as "Picture i: <image>" before the prompt,
    each shown to the vision tower at about 384x384."""

    name = "Qwen-Image-Edit-Plus's Qwen2.5-VL"
    condition_area = EDIT_PLUS_CONDITION_AREA

    def text(self, prompt: str, count: int) -> str:
        slots = "".join(f"Picture {i + 1}: {IMAGE_SLOT}" for i in range(count))
        return EDIT_TEMPLATE.format(slots + prompt)
