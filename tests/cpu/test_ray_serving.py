"""`ditserve serve` on Ray Serve (the default mode): a local Ray, one pool per stage, the router and
the gateway as deployments; REST and gRPC through Ray's proxies."""

import asyncio
import base64
import io
import re
import subprocess
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
from tests.lora_files import write_style_lora
from tests.servers import start_serve


@pytest.fixture(scope="module")
def lora_dir(flux_dev_dir, tmp_path_factory):
    return write_style_lora(tmp_path_factory.mktemp("loras"), flux_dev_dir, "xlabs")


@pytest.fixture(scope="module")
def ray_deployment(flux_dev_dir, lora_dir):
    t0 = time.monotonic()
    serve, http_port, grpc_port = start_serve(flux_dev_dir, "--served-model-name", "tiny-dev", "--lora-dir",
                                              str(lora_dir), ray=True, timeout_s=180)
    startup_s = time.monotonic() - t0
    yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "startup_s": startup_s,
           "line": serve.match.group(0)}
    serve.stop()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_local_deployment_comes_up_within_a_minute(ray_deployment):
    assert "with Ray Serve" in ray_deployment["line"]
    assert ray_deployment["startup_s"] < 60, ray_deployment
    assert httpx.get(ray_deployment["http"] + "/health").json()["stages"] == {
        "encoder": True, "denoiser": True, "vae": True}


def test_rest_and_grpc_give_in_process_pixels(ray_deployment, flux_dev_dir):
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))
    expected = asyncio.run(router.generate(GenerateRequest(prompt="a red circle", width=48, height=32, seed=12,
                                                           num_inference_steps=3))).images[0].pixels
    client = openai.OpenAI(base_url=ray_deployment["http"] + "/v1", api_key="unused")
    resp = client.images.generate(model="tiny-dev", prompt="a red circle", size="48x32",
                                  extra_body={"seed": 12, "num_inference_steps": 3})
    got = _pixels(resp.data[0].b64_json)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1

    with grpc.insecure_channel(ray_deployment["grpc"]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        reply = stub.Generate(generation_pb2.GenerateRequest(prompt="a red circle", width=48, height=32, seed=12,
                                                             num_inference_steps=3), timeout=120)
        grpc_pixels = np.asarray(Image.open(io.BytesIO(reply.images[0].data)).convert("RGB"))
        assert np.array_equal(grpc_pixels, got)
        events = list(stub.GenerateStream(generation_pb2.GenerateRequest(prompt="x", width=32, height=32,
                                                                         num_inference_steps=2), timeout=120))
        assert [e.WhichOneof("event") for e in events] == ["progress", "progress", "result"]
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(generation_pb2.GenerateRequest(prompt="x", width=40), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "multiple of 16" in info.value.details()


def test_rest_error_is_an_openai_error_object(ray_deployment):
    r = httpx.post(ray_deployment["http"] + "/v1/images/generations", json={"prompt": "x", "size": "48x40"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "height 40 is not a multiple of 16"


def test_killed_replica_fails_its_request_and_is_replaced(ray_deployment):
    url = ray_deployment["http"]
    box = {}

    def slow():
        box["r"] = httpx.post(url + "/v1/images/generations", timeout=120,
                              json={"prompt": "x", "size": "256x256", "num_inference_steps": 400, "timeout_s": 90})

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(3.0)
    pids = subprocess.run(["pgrep", "-f", "ServeReplica:ditserve:denoiser"], capture_output=True, text=True).stdout
    assert pids.strip(), "no denoiser replica process found"
    subprocess.run(["kill", "-9", *pids.split()])
    t.join(timeout=60)
    assert not t.is_alive(), "request hung after its replica died"
    assert box["r"].status_code == 503, box["r"].text
    assert box["r"].json()["error"]["code"] == "stage_unavailable"
    assert re.search("denoiser", box["r"].json()["error"]["message"])

    deadline = time.monotonic() + 60
    while True:  # Ray Serve's controller starts a replacement replica
        r = httpx.post(url + "/v1/images/generations", timeout=60,
                       json={"prompt": "x", "size": "32x32", "num_inference_steps": 2})
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(1)


def test_lora_and_cache_through_ray(ray_deployment, flux_dev_dir, lora_dir):
    """A uniform LoRA set takes the multiplexed route to the denoiser pool (Ray Serve prefers the
    replica that has the set merged); cache stats come back through the Ray handles."""
    body = dict(prompt="a red circle", size="48x32", seed=7, num_inference_steps=12)
    lora = [{"name": "style", "path": "style.safetensors", "strength": 0.8}]
    resp = httpx.post(ray_deployment["http"] + "/v1/images/generations", json={**body, "lora": lora}, timeout=120)
    assert resp.status_code == 200, resp.text
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))
    expected = asyncio.run(router.generate(GenerateRequest(
        prompt="a red circle", width=48, height=32, seed=7, num_inference_steps=12,
        lora=[{**lora[0], "path": str(lora_dir / "style.safetensors")}]))).images[0].pixels
    diff = np.abs(_pixels(resp.json()["data"][0]["b64_json"]).astype(int) - expected.astype(int))
    assert diff.max() <= 1
    resp = httpx.post(ray_deployment["http"] + "/v1/images/generations",
                      json={**body, "cache": {"preset": "fast"}}, timeout=120)
    assert resp.status_code == 200 and resp.json()["cache_stats"]["cached_steps"] >= 1
    bad = httpx.post(ray_deployment["http"] + "/v1/images/generations",
                     json={**body, "lora": [{"name": "x", "path": "/etc/hostname"}]}, timeout=60)
    assert bad.status_code == 400 and "LoRA 'x'" in bad.json()["error"]["message"]


def test_metrics_include_the_router_replica_series(ray_deployment):
    """Under Ray the router is its own deployment: the gateway's /metrics appends its series."""
    from tests.cpu.test_metrics import samples, value

    body = dict(prompt="a red circle", size="32x32", seed=1, num_inference_steps=2)
    assert httpx.post(ray_deployment["http"] + "/v1/images/generations", json=body, timeout=120).status_code == 200
    got = samples(httpx.get(ray_deployment["http"] + "/metrics").text)
    for stage in ("encoder", "denoiser", "vae"):
        assert value(got, "ditserve_peak_memory_bytes", stage=stage, rank="0") > 2**20
    assert value(got, "ditserve_requests_total", endpoint="images.generations", model="tiny-dev", status="ok") >= 1
