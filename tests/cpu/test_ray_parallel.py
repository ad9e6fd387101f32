"""Multi-rank replicas under Ray Serve (a Ulysses denoiser, a tensor-parallel T5 encoder): each
replica owns a placement group and its second rank is a Ray actor in it."""

import asyncio
import base64
import io
import subprocess
import time

import httpx
import numpy as np
from PIL import Image

from services.cli import build_in_process_router
from services.runtime.config import GenerateRequest, StageConfig
from tests.servers import start_serve


def _post(port, **body):
    return httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", timeout=120,
                      json={"prompt": "a cat", "size": "48x80", "num_inference_steps": 3, "seed": 5, **body})


def test_multi_rank_replicas_under_ray_give_single_rank_pixels(flux_tp_dir, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("denoiser:\n  ulysses_degree: 2\nencoder:\n  tp_size: 2\n")
    serve, http_port, _ = start_serve(flux_tp_dir, "--config", str(config), ray=True, timeout_s=180)
    try:
        r = _post(http_port)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))).astype(int)
        ranks = subprocess.run(["pgrep", "-f", "DenoiserRank"], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 1, "rank 1 should be a Ray actor of the replica's placement group"
        encoder_ranks = subprocess.run(["pgrep", "-f", "EncoderRank"], capture_output=True, text=True).stdout.split()
        assert len(encoder_ranks) == 1, "the encoder's rank 1 too"

        subprocess.run(["kill", "-9", *ranks])  # rank 1 dies between requests
        time.sleep(1)
        r = _post(http_port)
        assert r.status_code == 503 and "restarted" in r.json()["error"]["message"], r.text
        assert _post(http_port).status_code == 200  # served by the rebuilt replica
    finally:
        serve.stop()
    router = build_in_process_router(StageConfig(model_path=flux_tp_dir, device="cpu", dtype="float32"))
    expected = asyncio.run(router.generate(GenerateRequest(prompt="a cat", width=48, height=80, seed=5,
                                                           num_inference_steps=3))).images[0].pixels.astype(int)
    assert np.abs(got - expected).max() <= 1
