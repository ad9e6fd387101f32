"""Initial noise and the latent layouts: latents <-> DiT tokens, and the RoPE tables of a request.

PackedLatents2x2 is Flux.1's (Qwen-Image packs the same way, with centred positions); ZImageLatents
is Z-Image's patchify, padded to its multiple of 32 tokens; WanLatents patchifies video latents
and keeps the prompt out of the sequence; Flux2Latents samples in Flux.2's patchified shape.

Noise is drawn per image from a CPU generator seeded with that image's seed, exactly as
diffusers' randn_tensor does for a list of CPU generators: the same seed gives the same image on
any device, in any batch, on any number of ranks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from services.runtime.pipelines.z_image import SEQ_MULTI_OF


def initial_noise(seeds: list[int], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[len(seeds), *shape] standard normal, image i drawn from torch.Generator('cpu').manual_seed(seeds[i])."""
    draws = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s), dtype=dtype) for s in seeds]
    return torch.cat(draws, dim=0).to(device)


class PackedLatents2x2:
    """[B, C, h, w] latents <-> [B, (h/2)(w/2), 4C] tokens, with (0, row, col) position ids."""

    patch = 2
    # The prompt's tokens join the image's in one attended sequence (sharded with it under
    # sequence parallelism); False for DiTs that cross-attend to the prompt (Wan).
    text_in_sequence = True

    def __init__(self, channels: int, vae_scale_factor: int):
        self.channels = channels
        self.vae_scale_factor = vae_scale_factor

    @classmethod
    def for_model(cls, config, vae_scale_factor: int):
        # Packed tokens carry 2x2 patches of every latent channel: in_channels = 4 x channels.
        return cls(config.in_channels // 4, vae_scale_factor)

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * self.patch
        return self.patch * (height // f), self.patch * (width // f)

    def latent_grid(self, height: int, width: int, frames: int = 0) -> tuple[int, ...]:
        """The latent's sizes after the channels: (h, w) for an image layout; (f, h, w) for a
        video one, where `frames` is the latent frame count."""
        return self.latent_hw(height, width)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        (h, w), (b, _, d) = grid, tokens.shape
        x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, d // 4, h, w)

    def seq_len(self, grid: tuple[int, ...]) -> int:
        """The pipeline's image_seq_len of a latent of these sizes (the schedule's resolution shift)."""
        h, w = grid
        return (h // self.patch) * (w // self.patch)

    def rope(self, model, text_len: int, grid: tuple[int, ...], device: torch.device):
        """The model's RoPE tables for text_len text tokens and a latent of these sizes: one row
        per [text; image] token, as SequenceParallel.shard_rope expects."""
        return model.rope(self.text_ids(text_len, device), self.image_ids(*grid, device))

    @staticmethod
    def pad_text(embeds: torch.Tensor) -> torch.Tensor:
        """The prompt embeddings as the DiT takes them: as they are (the router hands only real tokens)."""
        return embeds

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
    from 0 on every axis (the model moves them past the image, see qwen_image.py).

    An edit model's input images (spec.image_conditioning) follow the noise tokens in the
    sequence, each packed the same way and centred on its own grid, at RoPE frame 1, 2, ...
    (QwenEmbedRope's index into the pipeline's img_shapes list)."""

    def rope(self, model, text_len: int, grid: tuple[int, ...], device: torch.device,
             references: tuple[tuple[int, ...], ...] = ()):
        """As PackedLatents2x2.rope; `references`: the latent grids of the input images whose
        tokens follow the noise's."""
        ids = torch.cat([self.image_ids(*g, device, frame=i) for i, g in enumerate((grid, *references))])
        return model.rope(self.text_ids(text_len, device), ids)

    def image_ids(self, h: int, w: int, device: torch.device, frame: int = 0) -> torch.Tensor:
        rows, cols = h // 2, w // 2
        ids = torch.zeros(rows, cols, 3, device=device)
        ids[..., 0] = frame
        ids[..., 1] += torch.arange(rows, device=device)[:, None] - (rows - rows // 2)
        ids[..., 2] += torch.arange(cols, device=device)[None, :] - (cols - cols // 2)
        return ids.reshape(-1, 3)

    @staticmethod
    def text_ids(seq_len: int, device: torch.device) -> torch.Tensor:
        return torch.arange(seq_len, device=device, dtype=torch.float32)[:, None].expand(seq_len, 3).contiguous()


# --- Z-Image ---------------------------------------------------------------------------------

# The (patch_size, f_patch_size) ZImagePipeline calls the transformer with (its forward defaults).
Z_IMAGE_PATCH = (2, 1)


def padded_len(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def pad_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[B, n, C] -> [B, padded_len(n), C], zeros appended: the model overwrites those rows with
    its learned pad tokens (its rope()'s pad table says where), so their content does not matter."""
    return F.pad(tokens, (0, 0, 0, padded_len(tokens.shape[1]) - tokens.shape[1]))


def patchify(latents: torch.Tensor, patch_size: int = Z_IMAGE_PATCH[0], f_patch_size: int = Z_IMAGE_PATCH[1]):
    """[B, C, H, W] (an image: one frame) or [B, C, F, H, W] -> tokens [B, f*h*w, pf*ph*pw*C],
    tokens in (f, h, w) order and features in (pf, ph, pw, C) order, as diffusers' _patchify_image."""
    if latents.ndim == 4:
        latents = latents.unsqueeze(2)  # the pipeline's unsqueeze(2)
    b, c, f, h, w = latents.shape
    p, pf = patch_size, f_patch_size
    x = latents.reshape(b, c, f // pf, pf, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (f // pf) * (h // p) * (w // p), pf * p * p * c)


def unpatchify(tokens: torch.Tensor, size: tuple[int, ...], patch_size: int = Z_IMAGE_PATCH[0],
               f_patch_size: int = Z_IMAGE_PATCH[1]) -> torch.Tensor:
    """Per-token outputs [B, N(+pad), pf*ph*pw*C] -> [B, C, H, W] for size (H, W), or
    [B, C, F, H, W] for size (F, H, W) (latent sizes). Rows past the grid (the pad tokens) are
    dropped, as diffusers' unpatchify does."""
    f, h, w = size if len(size) == 3 else (1, *size)
    p, pf = patch_size, f_patch_size
    grid = (f // pf, h // p, w // p)
    c = tokens.shape[-1] // (pf * p * p)
    x = tokens[:, : math.prod(grid)].reshape(tokens.shape[0], *grid, pf, p, p, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], c, f, h, w)
    return x if len(size) == 3 else x.squeeze(2)


class ZImageLatents(PackedLatents2x2):
    """Z-Image's layout: 2x2 patches with features in (ph, pw, C) order, and both the image tokens
    and the caption padded to multiples of 32 (the model writes its trained pad tokens there;
    they change the valid outputs, see models/z_image.py). The sampling state carries the image
    pads; the model outputs zero velocity there, so they stay zero and drop out at unpack. The
    schedule's seq_len is the unpadded count, the pipeline's image_seq_len. RoPE positions come
    from the model's rope(), which knows where its pads are."""

    @classmethod
    def for_model(cls, config, vae_scale_factor: int):
        return cls(config.in_channels, vae_scale_factor)  # Z-Image's in_channels counts latent channels

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pad_tokens(patchify(latents))

    def unpack(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        return unpatchify(tokens, grid)

    def rope(self, model, text_len: int, grid: tuple[int, ...], device: torch.device):
        return model.rope(text_len, *grid, device=device)

    pad_text = staticmethod(pad_tokens)


# --- Wan (video) -------------------------------------------------------------------------------


class WanLatents(PackedLatents2x2):
    """Wan's layout: [B, C, F, H, W] video latents <-> tokens by the DiT's (pt, ph, pw) patches
    (models/wan.py's patchify: the Conv3d patch embedding's order). The text is not part of the
    token sequence (Wan cross-attends to it): `text_in_sequence` False tells the runner to shard
    only the video tokens and hand every rank the whole prompt. RoPE covers the video tokens."""

    text_in_sequence = False

    def __init__(self, channels: int, vae_scale_factor: int, patch: tuple[int, int, int], out_channels: int):
        super().__init__(channels, vae_scale_factor)
        self.patch3d, self.out_channels = patch, out_channels

    @classmethod
    def for_model(cls, config, vae_scale_factor: int):
        # The sampled latent has the prediction's channels; an image-to-video DiT takes more
        # (in_channels 36 = 16 noise + 4 mask + 16 first-frame latent channels).
        out_channels = config.out_channels or config.in_channels
        return cls(out_channels, vae_scale_factor, config.patch_size, out_channels)

    def first_frame_condition(self, latent: torch.Tensor) -> torch.Tensor:
        """WanImageToVideoPipeline's condition for a first-frame clip's latent [C, f, h, w]: a
        mask (4 channels: the VAE's temporal factor; 1 on the first latent frame, which holds
        the given frame, 0 after) then the latent, patchified as the noise is: [1, N, P*(4 + C)]."""
        mask = torch.zeros(4, *latent.shape[1:], dtype=latent.dtype, device=latent.device)
        mask[:, 0] = 1
        return self.pack(torch.cat([mask, latent], dim=0)[None])

    def join_channels(self, tokens: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Tokens of the channel-wise cat([latents, condition], dim=1): features are (pt, ph, pw, C)
        ordered, so each patch position's channels are joined."""
        p = math.prod(self.patch3d)
        joined = torch.cat([tokens.unflatten(-1, (p, -1)), condition.unflatten(-1, (p, -1))], dim=-1)
        return joined.flatten(-2)

    def latent_grid(self, height: int, width: int, frames: int = 0) -> tuple[int, ...]:
        return max(frames, 1), height // self.vae_scale_factor, width // self.vae_scale_factor

    # models/wan.py is imported here, not at the top: the models package imports this module.
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        from services.denoiser.models.wan import patchify

        return patchify(latents, self.patch3d)

    def unpack(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        from services.denoiser.models.wan import unpatchify

        return unpatchify(tokens, *grid, self.patch3d, self.out_channels)

    def seq_len(self, grid: tuple[int, ...]) -> int:
        return math.prod(n // p for n, p in zip(grid, self.patch3d))

    def rope(self, model, text_len: int, grid: tuple[int, ...], device: torch.device):
        return model.rope(*grid, device=device)


# --- Flux.2 ------------------------------------------------------------------------------------


class Flux2Latents(PackedLatents2x2):
    """Flux.2's layout. The sampled latent is the VAE latent in 2x2 patches, [B, 4C, h/2, w/2]
    (models/flux2.py's patchify), because that is the shape Flux2Pipeline / Flux2KleinPipeline
    draw their noise in (prepare_latents), and a draw's shape decides a seed's values. So
    `channels` is the DiT's in_channels (4C) and the grid is the patchified one, and the stage's
    initial_noise(seeds, (channels, *grid)) is the pipeline's draw. Tokens are that grid's pixels,
    rows first; `unpack` hands the VAE stage the patchified latent, which undoes the VAE's
    batch-norm statistics and unpatchifies before decoding (services/vae/stage.py), as the
    pipelines do after their loop. Position ids: (t, row, col, index), models/flux2.py's."""

    @classmethod
    def for_model(cls, config, vae_scale_factor: int):
        return cls(config.in_channels, vae_scale_factor)

    def latent_grid(self, height: int, width: int, frames: int = 0) -> tuple[int, ...]:
        h, w = self.latent_hw(height, width)
        return h // 2, w // 2

    # models/flux2.py is imported here, not at the top: the models package imports this module.
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        from services.denoiser.models.flux2 import pack

        return pack(latents)

    def unpack(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        from services.denoiser.models.flux2 import unpack

        return unpack(tokens, *grid)

    def seq_len(self, grid: tuple[int, ...]) -> int:
        return math.prod(grid)  # the pipeline's image_seq_len: one token per patchified pixel

    def rope(self, model, text_len: int, grid: tuple[int, ...], device: torch.device):
        from services.denoiser.models.flux2 import image_ids, text_ids

        h, w = grid
        return model.rope(text_ids(text_len, device), image_ids(2 * h, 2 * w, device))
