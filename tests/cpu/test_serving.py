"""The disaggregated deployment: encoder / denoiser / VAE workers in their own processes, a
`ditserve serve` gateway in front, driven through the real openai client and gRPC stubs."""

import asyncio
import base64
import io
import threading
import time

import grpc
import httpx
import numpy as np
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from services.cli import build_in_process_router
from services.runtime.config import GenerateRequest, StageConfig
from services.runtime.proto import generation_pb2, generation_pb2_grpc
from tests.servers import free_port, start_serve, start_worker

STEPS = 3


@pytest.fixture(scope="module")
def deployment(flux_dev_dir, tmp_path_factory):
    workers = {role: start_worker(role, flux_dev_dir) for role in ("encoder", "denoiser", "vae")}
    config = tmp_path_factory.mktemp("cfg") / "serve.yaml"
    # A wide batching window makes the batching test deterministic on a slow CI machine.
    config.write_text("router:\n  batch_window_ms: 400\n  max_batch_size: 4\n")
    addresses = [f"--{role}-address=127.0.0.1:{port}" for role, (_, port) in workers.items()]
    serve, http_port, grpc_port = start_serve(flux_dev_dir, "--config", str(config), "--served-model-name", "tiny-dev",
                                              *addresses)
    yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
    serve.kill()
    for proc, _ in workers.values():
        proc.kill()


@pytest.fixture(scope="module")
def in_process(flux_dev_dir):
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))

    def generate(**kwargs):
        return asyncio.run(router.generate(GenerateRequest(**kwargs))).images[0].pixels

    return generate


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _assert_equal_up_to_rounding(got, expected):
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert got.shape == expected.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_openai_client_gets_in_process_pixels(deployment, in_process):
    client = openai.OpenAI(base_url=deployment["http"] + "/v1", api_key="unused")
    resp = client.images.generate(
        model="tiny-dev", prompt="a red circle", size="64x48", n=2, response_format="b64_json",
        extra_body={"seed": 21, "num_inference_steps": STEPS, "guidance_scale": 3.0},
    )
    assert len(resp.data) == 2
    for i, item in enumerate(resp.data):
        expected = in_process(prompt="a red circle", width=64, height=48, seed=21 + i,
                              num_inference_steps=STEPS, guidance_scale=3.0)
        _assert_equal_up_to_rounding(_png_pixels(base64.b64decode(item.b64_json)), expected)
    extra = resp.model_extra
    assert set(extra["timings"]) == {"encoder", "denoiser", "vae", "total"}
    assert all(v > 0 for v in extra["peak_memory_bytes"].values())


def test_url_response_and_true_cfg(deployment, in_process):
    client = openai.OpenAI(base_url=deployment["http"] + "/v1", api_key="unused")
    resp = client.images.generate(
        prompt="a blue square", size="48x48", response_format="url", output_format="png",
        extra_body={"seed": 4, "num_inference_steps": STEPS, "negative_prompt": "dark", "true_cfg_scale": 3.0},
    )
    content = httpx.get(resp.data[0].url)
    assert content.status_code == 200 and content.headers["content-type"] == "image/png"
    expected = in_process(prompt="a blue square", width=48, height=48, seed=4, num_inference_steps=STEPS,
                          negative_prompt="dark", true_cfg_scale=3.0)
    _assert_equal_up_to_rounding(_png_pixels(content.content), expected)


def test_grpc_generate_stream_and_list_models(deployment, in_process):
    with grpc.insecure_channel(deployment["grpc"]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        req = generation_pb2.GenerateRequest(prompt="a cat", width=32, height=64, num_inference_steps=STEPS, seed=8)
        reply = stub.Generate(req, timeout=120)
        expected = in_process(prompt="a cat", width=32, height=64, seed=8, num_inference_steps=STEPS)
        _assert_equal_up_to_rounding(_png_pixels(reply.images[0].data), expected)
        assert (reply.images[0].width, reply.images[0].height, reply.images[0].seed) == (32, 64, 8)
        assert {s.stage for s in reply.stages} == {"encoder", "denoiser", "vae"}

        events = list(stub.GenerateStream(req, timeout=120))
        progress = [e.progress.step for e in events if e.WhichOneof("event") == "progress"]
        assert progress == list(range(1, STEPS + 1))
        assert events[-1].WhichOneof("event") == "result"
        assert events[-1].result.images[0].data == reply.images[0].data

        models = stub.ListModels(generation_pb2.ListModelsRequest())
        assert [(m.id, m.family) for m in models.models] == [("tiny-dev", "flux")]
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_health_models_metrics(deployment):
    assert httpx.get(deployment["http"] + "/health").json()["stages"] == {"encoder": True, "denoiser": True, "vae": True}
    models = httpx.get(deployment["http"] + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny-dev"
    text = httpx.get(deployment["http"] + "/metrics").text
    assert "ditserve_requests_total" in text and "ditserve_peak_memory_bytes" in text


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"prompt": "x", "size": "65x48"}, 400, "width"),
        ({"prompt": "x", "size": "big"}, 400, "size"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "x", "bogus": 1}, 400, "bogus"),
        ({"prompt": "x", "model": "other"}, 404, None),
        ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps"),
        ({}, 400, "prompt"),
    ],
)
def test_rest_errors_are_openai_error_objects(deployment, body, status, param):
    r = httpx.post(deployment["http"] + "/v1/images/generations", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert "detail" not in r.json()


def test_unknown_route_and_bad_json_are_openai_errors(deployment):
    r = httpx.get(deployment["http"] + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(deployment["http"] + "/v1/images/generations", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_openai_client_raises_typed_errors(deployment):
    client = openai.OpenAI(base_url=deployment["http"] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="multiple of 16"):
        client.images.generate(prompt="x", size="100x100")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="dall-e-3")


@pytest.mark.parametrize(
    "fields,code",
    [
        (dict(prompt="x", width=100), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="x", model="other"), grpc.StatusCode.NOT_FOUND),
    ],
)
def test_grpc_errors_have_status_and_code(deployment, fields, code):
    with grpc.insecure_channel(deployment["grpc"]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(generation_pb2.GenerateRequest(**fields), timeout=30)
    assert info.value.code() == code
    assert info.value.details()
    assert dict(info.value.trailing_metadata())["ditserve-error-code"]


def test_concurrent_compatible_requests_share_a_batch(deployment, in_process):
    results = {}

    def call(seed):
        results[seed] = httpx.post(
            deployment["http"] + "/v1/images/generations",
            json={"prompt": f"a dog {seed}", "size": "32x32", "seed": seed, "num_inference_steps": STEPS},
            timeout=120,
        ).json()

    threads = [threading.Thread(target=call, args=(s,)) for s in (31, 32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, body in results.items():
        assert body["batch_size"] == 2, body
        expected = in_process(prompt=f"a dog {seed}", width=32, height=32, seed=seed, num_inference_steps=STEPS)
        _assert_equal_up_to_rounding(_png_pixels(base64.b64decode(body["data"][0]["b64_json"])), expected)


def test_deadline_gives_504_and_frees_the_stage(deployment):
    t0 = time.monotonic()
    r = httpx.post(
        deployment["http"] + "/v1/images/generations",
        json={"prompt": "slow", "size": "256x256", "num_inference_steps": 1000, "timeout_s": 1.0},
        timeout=60,
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - t0 < 10
    # The abandoned batch was cancelled on the worker: the next request is not stuck behind it.
    t1 = time.monotonic()
    ok = httpx.post(deployment["http"] + "/v1/images/generations",
                    json={"prompt": "fast", "size": "32x32", "num_inference_steps": 1}, timeout=60)
    assert ok.status_code == 200 and time.monotonic() - t1 < 10


def test_killed_worker_fails_its_request_cleanly_and_is_replaced(flux_dev_dir):
    port = free_port()
    workers = {role: start_worker(role, flux_dev_dir) for role in ("encoder", "vae")}
    workers["denoiser"] = start_worker("denoiser", flux_dev_dir, port)
    addresses = [f"--{role}-address=127.0.0.1:{p}" for role, (_, p) in workers.items()]
    serve, http_port, _ = start_serve(flux_dev_dir, *addresses)
    url = f"http://127.0.0.1:{http_port}"
    try:
        box = {}

        def slow_request():
            box["r"] = httpx.post(url + "/v1/images/generations", timeout=120,
                                  json={"prompt": "x", "size": "256x256", "num_inference_steps": 400, "timeout_s": 60})

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(2.0)  # well inside the denoising loop
        workers["denoiser"][0].kill()
        t.join(timeout=30)
        assert not t.is_alive(), "request hung after its worker died"
        assert box["r"].status_code == 503 and box["r"].json()["error"]["code"] == "stage_unavailable"
        assert httpx.get(url + "/health").status_code == 503

        workers["denoiser"] = start_worker("denoiser", flux_dev_dir, port)  # the pool's replacement
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "gateway never saw the replacement worker"
            time.sleep(0.3)
        r = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "size": "32x32", "num_inference_steps": 2})
        assert r.status_code == 200
    finally:
        serve.kill()
        for proc, _ in workers.values():
            proc.kill()


def test_cancelled_grpc_stream_frees_its_slot(deployment):
    with grpc.insecure_channel(deployment["grpc"]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        stream = stub.GenerateStream(generation_pb2.GenerateRequest(prompt="long", width=256, height=256,
                                                                    num_inference_steps=1000), timeout=300)
        first = next(stream)
        assert first.WhichOneof("event") == "progress"
        stream.cancel()  # the client goes away mid-denoise
        t0 = time.monotonic()
        reply = stub.Generate(generation_pb2.GenerateRequest(prompt="short", width=32, height=32,
                                                             num_inference_steps=1), timeout=60)
        assert len(reply.images) == 1
        # Not queued behind ~1000 abandoned steps: the worker stopped at its next step.
        assert time.monotonic() - t0 < 10


def test_full_queue_is_429(flux_dev_dir, tmp_path):
    config = tmp_path / "small-queue.yaml"
    config.write_text("router:\n  max_queue: 1\n  batch_window_ms: 3000\n")
    serve, http_port, _ = start_serve(flux_dev_dir, "--config", str(config))  # stages in-process
    url = f"http://127.0.0.1:{http_port}/v1/images/generations"
    try:
        box = {}
        waiting = threading.Thread(target=lambda: box.setdefault("first", httpx.post(
            url, json={"prompt": "a", "size": "32x32", "num_inference_steps": 1}, timeout=60)))
        waiting.start()
        time.sleep(1.0)  # the first request sits in its 3 s batch window
        r = httpx.post(url, json={"prompt": "b", "size": "32x32", "num_inference_steps": 1}, timeout=60)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        waiting.join()
        assert box["first"].status_code == 200
    finally:
        serve.stop()
