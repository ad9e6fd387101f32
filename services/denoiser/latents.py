"""Initial noise and the 2x2-packed latent layout (Flux.1; Qwen-Image uses the same packing).

Noise is drawn per image from a CPU generator seeded with that image's seed, exactly as
diffusers' randn_tensor does for a list of CPU generators: the same seed gives the same image on
any device, in any batch, on any number of ranks."""

from __future__ import annotations

import torch


def initial_noise(seeds: list[int], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[len(seeds), *shape] standard normal, image i drawn from torch.Generator('cpu').manual_seed(seeds[i])."""
    draws = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s), dtype=dtype) for s in seeds]
    return torch.cat(draws, dim=0).to(device)


class PackedLatents2x2:
    """[B, C, h, w] latents <-> [B, (h/2)(w/2), 4C] tokens, with (0, row, col) position ids."""

    patch = 2

    def __init__(self, channels: int, vae_scale_factor: int):
        self.channels = channels
        self.vae_scale_factor = vae_scale_factor

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * self.patch
        return self.patch * (height // f), self.patch * (width // f)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, d = tokens.shape
        x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, d // 4, h, w)

    def image_ids(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        ids = torch.zeros(h // 2, w // 2, 3, device=device)
        ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
        return ids.reshape(-1, 3)

    @staticmethod
    def text_ids(seq_len: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(seq_len, 3, device=device)


class CenteredLatents2x2(PackedLatents2x2):
    """Qwen-Image's layout: the same 2x2 packing, with RoPE positions centred on the image
    (rows -(H - H//2) .. H//2 - 1 of H token rows, columns likewise) and text positions counting
    from 0 on every axis (the model moves them past the image, see qwen_image.py)."""

    def image_ids(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        rows, cols = h // 2, w // 2
        ids = torch.zeros(rows, cols, 3, device=device)
        ids[..., 1] += torch.arange(rows, device=device)[:, None] - (rows - rows // 2)
        ids[..., 2] += torch.arange(cols, device=device)[None, :] - (cols - cols // 2)
        return ids.reshape(-1, 3)

    @staticmethod
    def text_ids(seq_len: int, device: torch.device) -> torch.Tensor:
        return torch.arange(seq_len, device=device, dtype=torch.float32)[:, None].expand(seq_len, 3).contiguous()
