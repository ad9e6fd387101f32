"""The diffusers backend: pipelines with no native family (tiny SD3, PixArt-Sigma, Wan 2.1 / 2.2
here) run
whole in the denoiser worker, behind the same router, CLI, REST and gRPC, and give exactly the
pixels of diffusers' own pipeline on the same directory and seeds."""

import asyncio
import base64
import io
import sqlite3

import grpc
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
from services.runtime.proto import generation_pb2, generation_pb2_grpc
from services.runtime.registry import resolve
from tests.servers import start_serve, start_worker
from tests.tiny_families import (
    build_tiny_pixart_sigma,
    build_tiny_sd3,
    build_tiny_wan,
)

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


# Qwen-Image, Z-Image and Flux.2 [klein] are served natively (tests/cpu/test_qwen_image.py,
# test_z_image.py, test_flux2.py); --backend diffusers is checked for a native family below, on Flux.
@pytest.mark.parametrize("family", ["sd3_dir", "pixart_dir"])
def test_pixels_equal_diffusers_pipeline(family, request):
    path = request.getfixturevalue(family)
    # a negative prompt where the pipeline takes one
    neg = {"negative_prompt": "blurry"} if "negative_prompt" in resolve(path)[1].features else {}
    router, result, steps = generate(path, prompt="a red circle on a white background", width=64, height=48, n=2,
                                     seed=7, guidance_scale=4.0, **neg)
    assert router.spec.whole_pipeline and router.encoder is None and router.vae is None
    expected = diffusers_pixels(path, "a red circle on a white background", [7, 8], width=64, height=48,
                                guidance_scale=4.0, **neg)
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
    with pytest.raises(UnsupportedModelError, match="attention_precision: not available with the diffusers backend"):
        DenoiserStage(DenoiserConfig(model_path=sd3_dir, device="cpu", attention_precision="fp8"))
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


# WanPipeline (Wan 2.1 T2V, Wan 2.2 A14B) is served natively; the video tests below run it
# through the CLI, REST (OpenAI's videos API) and gRPC (tests/cpu/test_wan.py checks the frames);
# image-to-video still goes through the diffusers backend.
@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "model")


def diffusers_frames(path, prompt: str, seed: int, **kwargs) -> np.ndarray:
    import torch

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=[prompt], generator=[torch.Generator("cpu").manual_seed(seed)], num_inference_steps=STEPS,
                  output_type="np", **kwargs).frames[0]
    return (frames * 255).round().astype("uint8")


def mp4_frames(data: bytes) -> tuple[np.ndarray, float]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]), float(stream.average_rate)


def test_video_frames_equal_diffusers_and_cli_writes_mp4_and_frames(wan_dir, tmp_path, capsys):
    _, result, steps = generate(wan_dir, prompt="a red circle", width=48, height=32, num_frames=9, seed=5)
    expected = diffusers_frames(wan_dir, "a red circle", 5, width=48, height=32, num_frames=9)
    np.testing.assert_array_equal(result.images[0].pixels, expected)
    assert (result.request.num_frames, result.request.fps) == (9, 16) and len(steps) == STEPS
    args = ["generate", "--model-path", str(wan_dir), "--prompt", "a red circle", "--width", "48", "--height", "32",
            "--num-frames", "9", "--num-inference-steps", str(STEPS), "--seed", "5", "--no-progress"]
    assert main([*args, "--fps", "8", "-o", str(tmp_path / "clip.mp4")]) == 0
    frames, rate = mp4_frames((tmp_path / "clip.mp4").read_bytes())
    assert frames.shape == (9, 32, 48, 3) and rate == 8
    assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 12  # H.264 at CRF 18: close, not exact
    assert main([*args, "-o", str(tmp_path / "frames") + "/"]) == 0
    pngs = sorted((tmp_path / "frames").glob("frame_*.png"))
    assert len(pngs) == 9 and np.array_equal(np.asarray(Image.open(pngs[4]).convert("RGB")), expected[4])
    capsys.readouterr()
    assert main([*args[:-7], "--num-frames", "10", "-o", str(tmp_path / "x.mp4")]) == 2
    assert "num_frames 10 does not fit wan's VAE, which folds 4 frames into one: use 1 + 4k " \
           "frames (e.g. 9 or 13)" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "x.png")]) == 2
    assert "a video model writes .mp4, or a directory" in capsys.readouterr().err


def test_videos_api_with_the_openai_client_survives_a_gateway_restart(wan_dir, tmp_path):
    db = tmp_path / "videos.sqlite3"
    serve, http_port, grpc_port = start_serve(wan_dir, "--video-jobs-path", str(db))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # gRPC: the MP4 in the reply
            reply = generation_pb2_grpc.GenerationStub(channel).Generate(generation_pb2.GenerateRequest(
                prompt="a blue square", width=48, height=32, num_frames=5, fps=8, seed=9, num_inference_steps=STEPS))
        assert not reply.images and (reply.videos[0].num_frames, reply.videos[0].fps) == (5, 8)
        frames, rate = mp4_frames(reply.videos[0].data)
        expected = diffusers_frames(wan_dir, "a blue square", 9, width=48, height=32, num_frames=5)
        assert frames.shape == (5, 32, 48, 3) and rate == 8
        assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 12
        url = f"http://127.0.0.1:{http_port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        extra = {"num_inference_steps": STEPS, "seed": 9, "fps": 8}
        video = client.videos.create_and_poll(prompt="a blue square", size="48x32", seconds="1", extra_body=extra,
                                              poll_interval_ms=100)
        assert video.status == "completed" and video.progress == 100 and video.size == "48x32"
        assert video.model_extra["num_frames"] == 9 and video.seconds == "1.125"  # 1 s at 8 fps -> 1 + 4k = 9
        frames, rate = mp4_frames(client.videos.download_content(video.id).read())
        expected = diffusers_frames(wan_dir, "a blue square", 9, width=48, height=32, num_frames=9)
        assert frames.shape == expected.shape and rate == 8
        assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 12
        # JSON body too; a bad frame count is a 400 at once, not a failed job
        bad = httpx.post(url + "/v1/videos", json={"prompt": "x", "num_frames": 10})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "num_frames"
        assert httpx.post(url + "/v1/images/generations", json={"prompt": "x"}).status_code == 400
        assert httpx.get(url + "/v1/videos/video_nope").status_code == 404
        # a job the gateway was running when it died runs again after the restart
        queued = httpx.post(url + "/v1/videos", json={"prompt": "a green triangle", "size": "48x32",
                                                      "num_frames": 5, **extra})
        assert queued.status_code == 200 and queued.headers["openai-poll-after-ms"]
        serve.kill()
        with sqlite3.connect(db) as conn:  # the tiny model may have finished it already: make it unfinished
            conn.execute("UPDATE videos SET status = 'in_progress', progress = 37, content = NULL, completed_at = NULL "
                         "WHERE id = ?", (queued.json()["id"],))
        serve, http_port, _ = start_serve(wan_dir, "--video-jobs-path", str(db))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused")
        again = client.videos.poll(queued.json()["id"], poll_interval_ms=100)
        assert again.status == "completed" and again.model_extra["num_frames"] == 5
        listed = client.videos.list()
        assert {v.id for v in listed.data} == {video.id, again.id}  # the first one is still there
        assert client.videos.delete(video.id).deleted
        assert [v.id for v in client.videos.list().data] == [again.id]
    finally:
        serve.kill()


@pytest.fixture(scope="module")
def img2img_dir(flux_dev_dir, tmp_path_factory):
    """The tiny Flux checkpoint as FluxImg2ImgPipeline (same components; it needs an input image)."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("img2img") / "model"
    shutil.copytree(flux_dev_dir, path)
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxImg2ImgPipeline"}))
    return path


def _input_png() -> bytes:
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[8:40, 16:48] = (220, 30, 30)  # a red square on black
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_image_edits_with_the_openai_client(img2img_dir):
    serve, http_port, grpc_port = start_serve(img2img_dir)
    try:
        url = f"http://127.0.0.1:{http_port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        resp = client.images.edit(image=("in.png", _input_png(), "image/png"), prompt="a blue square", size="64x48",
                                  response_format="b64_json",
                                  extra_body={"seed": 3, "num_inference_steps": STEPS, "guidance_scale": 2.5})
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json))).convert("RGB"))
        expected = diffusers_pixels(img2img_dir, "a blue square", [3], image=Image.open(io.BytesIO(_input_png())),
                                    width=64, height=48, guidance_scale=2.5, max_sequence_length=512)
        np.testing.assert_array_equal(got, expected[0])
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # the same edit over gRPC
            reply = generation_pb2_grpc.GenerationStub(channel).Generate(generation_pb2.GenerateRequest(
                prompt="a blue square", width=64, height=48, seed=3, num_inference_steps=STEPS, guidance_scale=2.5,
                input_images=[_input_png()]))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(reply.images[0].data)).convert("RGB")),
                                      expected[0])
        # what such a model cannot do without its image, and what is not an image
        no_image = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "size": "64x48"})
        assert no_image.status_code == 400 and "needs an input image" in no_image.json()["error"]["message"]
        junk = httpx.post(url + "/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", b"not a png")})
        assert junk.status_code == 400 and junk.json()["error"]["param"] == "image"
        assert "not an image" in junk.json()["error"]["message"]
        none = httpx.post(url + "/v1/images/edits", data={"prompt": "x"}, files={"other": ("a.txt", b"x")})
        assert none.status_code == 400 and none.json()["error"]["param"] == "image"
    finally:
        serve.kill()


def test_input_images_reach_only_models_that_take_them(flux_dev_dir, img2img_dir, tmp_path, capsys):
    with pytest.raises(InvalidRequestError, match="image: flux takes no input image"):
        generate(flux_dev_dir, prompt="x", images=[_input_png()])
    (tmp_path / "in.png").write_bytes(_input_png())
    args = ["generate", "--model-path", str(img2img_dir), "--prompt", "a blue square", "--width", "64", "--height",
            "48", "--num-inference-steps", str(STEPS), "--seed", "3", "--no-progress", "-o", str(tmp_path / "o.png")]
    assert main([*args, "--image", str(tmp_path / "in.png")]) == 0
    assert Image.open(tmp_path / "o.png").size == (64, 48)
    capsys.readouterr()
    assert main(args) == 2 and "image: diffusers:FluxImg2ImgPipeline needs an input image" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["auto", "diffusers"], ids=["native", "diffusers"])
def test_image_to_video_with_input_reference(wan_dir, tmp_path, backend):
    """OpenAI's videos API with `input_reference` on WanImageToVideoPipeline, served natively
    (the first frame through the VAE worker's encode) and through the diffusers backend."""
    from tests.tiny_families import build_tiny_wan_i2v

    i2v_dir = build_tiny_wan_i2v(tmp_path / "wan-i2v")
    serve, http_port, _ = start_serve(i2v_dir, "--video-jobs-path", str(tmp_path / "v.sqlite3"), "--backend", backend)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused")
        video = client.videos.create_and_poll(prompt="the square moves", size="64x48",
                                              input_reference=("first.png", _input_png(), "image/png"),
                                              extra_body={"num_frames": 5, "seed": 2, "num_inference_steps": STEPS},
                                              poll_interval_ms=100)
        assert video.status == "completed", video.error
        frames, _ = mp4_frames(client.videos.download_content(video.id).read())
        expected = diffusers_frames(i2v_dir, "the square moves", 2, image=Image.open(io.BytesIO(_input_png())),
                                    width=64, height=48, num_frames=5)
        assert frames.shape == expected.shape
        assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 12  # H.264: close, not exact
        missing = httpx.post(f"http://127.0.0.1:{http_port}/v1/videos", json={"prompt": "x", "num_frames": 5})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "image"
    finally:
        serve.kill()
    with pytest.raises(InvalidRequestError, match="image: wan takes no input image"):
        generate(wan_dir, prompt="x", num_frames=5, images=[_input_png()])


def test_warm_up_runs_the_pipeline_once_per_size(sd3_dir, monkeypatch):
    from services.denoiser.diffusers_backend import DiffusersPipelineStage

    seen = []
    original = DiffusersPipelineStage.denoise
    monkeypatch.setattr(DiffusersPipelineStage, "denoise", lambda self, req, on_step=None: seen.append(
        (req.width, req.height, req.num_inference_steps)) or original(self, req, on_step))
    DenoiserStage(DenoiserConfig(model_path=sd3_dir, device="cpu", warmup_resolutions=["64x32", "48x48"]))
    assert seen == [(64, 32, 1), (48, 48, 1)]
    with pytest.raises(InvalidRequestError, match="warmup resolution 40x40: sides must be multiples of 16"):
        DenoiserStage(DenoiserConfig(model_path=sd3_dir, device="cpu", warmup_resolutions=["40x40"]))


def test_input_files_are_checked_before_they_cost_anything(img2img_dir, wan_dir):
    router = build_in_process_router(StageConfig(model_path=img2img_dir, device="cpu"))
    with pytest.raises(InvalidRequestError, match="takes one input image, got 2"):
        router.resolve(GenerateRequest.parse(prompt="x", images=[_input_png()] * 2))
    huge = io.BytesIO()
    Image.new("1", (4100, 4100)).save(huge, format="PNG")  # small file, 16.8M pixels: refused from its header
    with pytest.raises(InvalidRequestError, match="4100x4100 is larger than"):
        router.resolve(GenerateRequest.parse(prompt="x", images=[huge.getvalue()]))
    with pytest.raises(InvalidRequestError, match="takes no input mask"):
        router.resolve(GenerateRequest.parse(prompt="x", images=[_input_png()], mask=_input_png()))
    video = build_in_process_router(StageConfig(model_path=wan_dir, device="cpu"))
    with pytest.raises(InvalidRequestError, match="seconds 120 at 120 fps is 14401 frames") as err:
        video.resolve(GenerateRequest.parse(prompt="x", seconds=120, fps=120))
    assert err.value.param == "seconds"


def test_mask_follows_openai_transparency_and_diffusers_grey_levels():
    from services.router.requests import _decode

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:2, :, 3] = 0  # transparent top half: OpenAI's "edit here"
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    mask = _decode(buf.getvalue(), "mask")
    assert mask.shape == (4, 4) and (mask[:2] == 255).all() and (mask[2:] == 0).all()
    grey = io.BytesIO()
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint8), "L").save(grey, format="PNG")
    assert (_decode(grey.getvalue(), "mask") == 200).all()


def test_wan22_two_experts_run_in_one_denoiser_worker(tmp_path):
    """Wan 2.2 A14B's layout through the diffusers backend (forced: the native Wan family serves it
    too, tests/cpu/test_wan.py): transformer (high noise) and transformer_2 (after the boundary
    timestep) both live in the one worker; the clip equals WanPipeline's."""
    path = build_tiny_wan(tmp_path / "wan22", two_experts=True)
    router, result, _ = generate(path, "diffusers", prompt="a red circle", width=48, height=32, num_frames=5, seed=2)
    pipe = router.denoiser.stage.pipe
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    expected = diffusers_frames(path, "a red circle", 2, width=48, height=32, num_frames=5)
    np.testing.assert_array_equal(result.images[0].pixels, expected)
