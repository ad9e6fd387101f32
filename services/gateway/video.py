"""Encoding generated video frames: H.264 MP4 through PyAV (FFmpeg's libraries, bundled in its
wheels), or numbered PNG frames."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np

from services.gateway.images import encode_image

MP4_MIME = "video/mp4"


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """uint8 [F, H, W, 3] -> MP4 bytes (H.264, yuv420p, CRF 18: visually lossless, and what
    every player and browser decodes). yuv420p needs even sides; the models' sizes are
    multiples of 16, so nothing is cropped in practice."""
    import av

    f, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "medium"}
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]),
                                               format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())  # flush
    return buf.getvalue()


def write_png_frames(frames: np.ndarray, directory: Path) -> list[Path]:
    """uint8 [F, H, W, 3] -> directory/frame_00000.png, ... (lossless: the model's exact pixels)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        paths.append(directory / f"frame_{i:05d}.png")
        paths[-1].write_bytes(encode_image(frame, "png"))
    return paths
