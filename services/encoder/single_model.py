"""What the one-language-model prompt encoders (qwen_vl, qwen3, umt5) share: loading the
`tokenizer` and `text_encoder` components, refusing tensor parallelism (implemented for Flux's
T5 only, t5_parallel.py), and encoding each distinct prompt on its own.

Each distinct prompt goes through the model alone, as the pipelines encode a one-prompt request:
a request's embeddings then do not depend on the other prompts of its batch (a batched call
agrees only to rounding, in half precision visibly so). The cost is one language-model call per
distinct prompt, small next to the DiT's steps."""

from __future__ import annotations

import torch

from services.runtime.components import load_component
from services.runtime.errors import InvalidRequestError, ModelLoadError
from services.runtime.registry import ModelDir
from services.runtime.tensor_parallel import TensorParallel


def encode_each(prompts: list[str], encode_one) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each distinct prompt through encode_one(prompt) -> [L_i, D] once; returns (embeds [B, L, D]
    zero-padded to the longest row, an empty pooled [B, 0], lengths [B])."""
    distinct = {p: encode_one(p) for p in dict.fromkeys(prompts)}
    rows = [distinct[p] for p in prompts]
    longest = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int64)
    return embeds, embeds.new_zeros(len(prompts), 0), lengths


class SingleModelPromptEncoder:
    """Base of the prompt encoders with one tokenizer and one text encoder."""

    name = "this text encoder"  # for messages, e.g. "Qwen-Image's Qwen2.5-VL"

    def __init__(self, model: ModelDir, *, device: torch.device, dtype: torch.dtype, tp: TensorParallel | None = None):
        if tp is not None:
            raise InvalidRequestError("encoder tensor parallelism is implemented for T5 encoders only", "tp_size")
        self.device = device
        self.tokenizer = self.load_tokenizer(model)
        self.text_encoder = load_component(model, "text_encoder", dtype=dtype, device=device)

    def load_tokenizer(self, model: ModelDir):
        """The `tokenizer` component, as model_index.json names it."""
        return load_component(model, "tokenizer")

    @staticmethod
    def tokenizer_from(model: ModelDir, folder: str):
        """The tokenizer files of a processor folder alone (its image half would need torchvision)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model.path / folder)
        except Exception as exc:  # the libraries raise many types
            raise ModelLoadError(f"failed to load the tokenizer in {model.path / folder}: {exc}") from exc

    @classmethod
    def check_tp(cls, model: ModelDir, tp_size: int) -> None:
        if tp_size > 1:
            raise InvalidRequestError(
                f"encoder --tp-size {tp_size}: tensor parallelism is implemented for T5 encoders only, not "
                f"{cls.name}", "tp_size")
