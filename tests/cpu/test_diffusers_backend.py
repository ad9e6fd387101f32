"""The diffusers backend: pipelines with no native family (tiny SD3 and PixArt-Sigma here) run
whole in the denoiser worker, behind the same router, CLI, REST and gRPC, and give exactly the
pixels of diffusers' own pipeline on the same directory and seeds."""

import asyncio
import base64
import io

import httpx
import numpy as np
import openai
import pytest
from diffusers import DiffusionPipeline
from PIL import Image

from services.cli import build_in_process_router, main
from services.denoiser.stage import DenoiserStage
from services.encoder.stage import EncoderStage
from services.runtime.config import DenoiserConfig, GenerateRequest, StageConfig
from services.runtime.errors import InvalidRequestError, UnsupportedModelError
from services.runtime.registry import resolve
from tests.servers import start_serve, start_worker
from tests.tiny_families import build_tiny_pixart_sigma, build_tiny_sd3

STEPS = 3


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "model")


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return build_tiny_pixart_sigma(tmp_path_factory.mktemp("pixart") / "model")


def diffusers_pixels(path, prompt: str, seeds: list[int], **kwargs) -> list[np.ndarray]:
    """diffusers' own pipeline, one generator per image as ditserve seeds them, PIL output."""
    import torch

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    if "negative_prompt" in kwargs:
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(seeds)
    images = pipe(prompt=[prompt] * len(seeds), generator=gens, num_inference_steps=STEPS, **kwargs).images
    return [np.asarray(im) for im in images]


def generate(path, backend: str = "auto", **fields):
    router = build_in_process_router(StageConfig(model_path=path, device="cpu", backend=backend))
    steps = []
    result = asyncio.run(router.generate(GenerateRequest.parse(num_inference_steps=STEPS, **fields),
                                         on_step=lambda done, total: steps.append((done, total))))
    return router, result, steps


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_pixels_equal_diffusers_pipeline(family, sd3_dir, pixart_dir):
    path = {"sd3": sd3_dir, "pixart": pixart_dir}[family]
    router, result, steps = generate(path, prompt="a red circle on a white background", negative_prompt="blurry",
                                     width=64, height=48, n=2, seed=7, guidance_scale=4.0)
    assert router.spec.whole_pipeline and router.encoder is None and router.vae is None
    expected = diffusers_pixels(path, "a red circle on a white background", [7, 8], negative_prompt="blurry",
                                width=64, height=48, guidance_scale=4.0)
    for image, want in zip(result.images, expected):
        assert image.pixels.shape == (48, 64, 3)
        np.testing.assert_array_equal(image.pixels, want)
    assert not np.array_equal(result.images[0].pixels, result.images[1].pixels)  # seeds 7 and 8
    assert steps == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert set(result.stages) == {"denoiser"} and result.stages["denoiser"].seconds > 0


def test_backend_diffusers_forces_the_whole_pipeline_for_a_native_family(flux_dev_dir):
    """Flux has a native family; --backend diffusers serves it through diffusers' FluxPipeline."""
    assert not resolve(flux_dev_dir)[1].whole_pipeline
    router, result, _ = generate(flux_dev_dir, backend="diffusers", prompt="a blue square", width=64, height=64,
                                 seed=3, guidance_scale=3.5)
    assert router.spec.family == "diffusers:FluxPipeline"
    expected = diffusers_pixels(flux_dev_dir, "a blue square", [3], width=64, height=64, guidance_scale=3.5,
                                max_sequence_length=512)
    np.testing.assert_array_equal(result.images[0].pixels, expected[0])


def test_what_the_backend_cannot_do_is_refused(sd3_dir, tmp_path):
    router = build_in_process_router(StageConfig(model_path=sd3_dir, device="cpu"))
    for fields, param in (({"lora": [{"name": "x", "path": "x.safetensors"}]}, "lora"),
                          ({"cache": {"preset": "fast"}}, "cache")):
        with pytest.raises(InvalidRequestError, match="not available for diffusers:StableDiffusion3Pipeline") as err:
            asyncio.run(router.generate(GenerateRequest.parse(prompt="x", **fields)))
        assert err.value.param == param
    with pytest.raises(UnsupportedModelError, match="ulysses_degree: not available with the diffusers backend"):
        DenoiserStage(DenoiserConfig(model_path=sd3_dir, device="cpu", ulysses_degree=2))
    with pytest.raises(UnsupportedModelError, match="runs whole in the denoiser worker: it has no encoder worker"):
        EncoderStage(StageConfig(model_path=sd3_dir, device="cpu"))
    with pytest.raises(UnsupportedModelError, match="no native family for pipeline class 'StableDiffusion3Pipeline'"):
        resolve(sd3_dir, "native")
    (tmp_path / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    with pytest.raises(UnsupportedModelError, match="neither a native family .* nor a diffusers pipeline"):
        resolve(tmp_path)


def test_cli_generate_and_native_refusal(sd3_dir, tmp_path, capsys):
    out = tmp_path / "sd3.png"
    assert main(["generate", "--model-path", str(sd3_dir), "--prompt", "a dog", "--device", "cpu", "--height", "32",
                 "--width", "32", "--num-inference-steps", "2", "--seed", "1", "--no-progress", "-o", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    assert main(["generate", "--model-path", str(sd3_dir), "--prompt", "a dog", "--backend", "native",
                 "--no-progress", "-o", str(out)]) == 2
    assert "no native family for pipeline class 'StableDiffusion3Pipeline'" in capsys.readouterr().err


def test_denoiser_worker_over_grpc_behind_the_gateway(pixart_dir):
    """Only a denoiser worker: the gateway's router needs no encoder or VAE address."""
    worker, port = start_worker("denoiser", pixart_dir)
    serve = None
    try:
        serve, http_port, _ = start_serve(pixart_dir, f"--denoiser-address=127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused")
        resp = client.images.generate(model="model", prompt="a green triangle", size="64x32", n=1,
                                      response_format="b64_json",
                                      extra_body={"seed": 11, "num_inference_steps": STEPS, "guidance_scale": 4.5})
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json))).convert("RGB"))
        np.testing.assert_array_equal(got, diffusers_pixels(pixart_dir, "a green triangle", [11], width=64, height=32,
                                                            guidance_scale=4.5)[0])
        assert set(resp.model_extra["timings"]) == {"denoiser", "total"}
    finally:
        for proc in (serve, worker):
            if proc is not None:
                proc.kill()


def test_ray_deployment_runs_only_the_denoiser_pool(sd3_dir):
    """Under Ray Serve the application deploys no encoder or VAE pool for such a model."""
    serve, http_port, _ = start_serve(sd3_dir, ray=True, timeout_s=180)
    try:
        url = f"http://127.0.0.1:{http_port}"
        assert httpx.get(url + "/health").json()["stages"] == {"denoiser": True}
        resp = httpx.post(url + "/v1/images/generations", timeout=120, json={
            "prompt": "a yellow square", "size": "32x32", "seed": 4, "num_inference_steps": STEPS,
            "guidance_scale": 5.0, "response_format": "b64_json"})
        assert resp.status_code == 200, resp.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.json()["data"][0]["b64_json"]))).convert("RGB"))
        np.testing.assert_array_equal(got, diffusers_pixels(sd3_dir, "a yellow square", [4], width=32, height=32,
                                                            guidance_scale=5.0)[0])
        bad = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "cache": {"preset": "fast"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache"
    finally:
        serve.stop()
