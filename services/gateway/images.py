"""Encoding generated pixels into the image formats the API offers."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def format_for_path(suffix: str) -> str | None:
    """'png' / 'jpeg' / 'webp' for a file suffix, None if we cannot write that format."""
    return _EXTENSIONS.get(suffix.lower())


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """uint8 [H, W, 3] -> file bytes. PNG is lossless (the pixels diffusers would give);
    JPEG/WebP at quality 95."""
    buf = io.BytesIO()
    options = {} if fmt == "png" else {"quality": 95}
    Image.fromarray(pixels).save(buf, format=fmt.upper(), **options)
    return buf.getvalue()
