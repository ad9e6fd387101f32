"""LoRA and DiT caching through the disaggregated deployment (encoder / denoiser / VAE workers,
gateway with --lora-dir): REST fields and endpoints, gRPC fields, errors that name the adapter."""

import asyncio
import base64

import grpc
import httpx
import numpy as np
import pytest

from services.cli import build_in_process_router
from services.runtime.config import GenerateRequest, StageConfig
from services.runtime.proto import common_pb2, generation_pb2, generation_pb2_grpc
from tests.cpu.test_serving import _assert_equal_up_to_rounding, _png_pixels
from tests.lora_files import write_style_lora
from tests.servers import disaggregated

BODY = dict(prompt="a red circle", size="48x32", seed=7, num_inference_steps=4)


@pytest.fixture(scope="module")
def lora_dir(flux_dev_dir, tmp_path_factory):
    return write_style_lora(tmp_path_factory.mktemp("loras"), flux_dev_dir, "kohya")


@pytest.fixture(scope="module")
def server(flux_dev_dir, lora_dir):
    with disaggregated(flux_dev_dir, "--lora-dir", str(lora_dir)) as urls:
        yield urls


@pytest.fixture(scope="module")
def in_process(flux_dev_dir):
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))
    return lambda **kw: asyncio.run(router.generate(GenerateRequest(**kw))).images[0].pixels


def _post(server, path, body=None):
    return httpx.post(server["http"] + path, json=body, timeout=120)


def _image(resp):
    assert resp.status_code == 200, resp.text
    return _png_pixels(base64.b64decode(resp.json()["data"][0]["b64_json"]))


def test_rest_lora_and_cache(server, in_process, lora_dir):
    lora = [{"name": "style", "path": "style.safetensors", "strength": 0.8}]
    got = _image(_post(server, "/v1/images/generations", {**BODY, "lora": lora}))
    expected = in_process(prompt="a red circle", width=48, height=32, seed=7, num_inference_steps=4,
                          lora=[{**lora[0], "path": str(lora_dir / "style.safetensors")}])
    _assert_equal_up_to_rounding(got, expected)
    resp = _post(server, "/v1/images/generations", {**BODY, "num_inference_steps": 12, "cache": {"preset": "fast"}})
    stats = resp.json()["cache_stats"]
    assert stats["computed_steps"] + stats["cached_steps"] == 12 and stats["cached_steps"] >= 1
    assert _post(server, "/v1/images/generations", BODY).json()["cache_stats"] is None


@pytest.mark.parametrize("lora,message", [
    ({"name": "evil", "path": "../../etc/passwd"}, "LoRA 'evil': '../../etc/passwd' is outside the LoRA directory"),
    ({"name": "ghost"}, "unknown LoRA 'ghost'"),
    ({"name": "gone", "path": "gone.safetensors"}, "LoRA 'gone': no such file"),
])
def test_rest_bad_lora_is_400_and_the_server_keeps_serving(server, lora, message):
    resp = _post(server, "/v1/images/generations", {**BODY, "lora": [lora]})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert message in err["message"] and err["param"] == "lora"
    assert _post(server, "/v1/images/generations", BODY).status_code == 200


def test_server_wide_lora_endpoints(server):
    base = _image(_post(server, "/v1/images/generations", BODY))
    explicit = _image(_post(server, "/v1/images/generations",
                            {**BODY, "lora": [{"name": "s", "path": "style.safetensors", "strength": 0.5}]}))
    listed = _post(server, "/v1/set_lora", {"lora_nickname": "style", "lora_path": "style.safetensors",
                                            "strength": 0.5}).json()
    assert listed["loras"][0]["lora_nickname"] == "style" and listed["merged"]
    try:
        assert np.array_equal(_image(_post(server, "/v1/images/generations", BODY)), explicit)  # the default now
        assert not _post(server, "/v1/unmerge_lora_weights").json()["merged"]
        assert np.array_equal(_image(_post(server, "/v1/images/generations", BODY)), base)
        assert _post(server, "/v1/merge_lora_weights").json()["active"] == [{"lora_nickname": "style",
                                                                               "strength": 0.5}]
        assert httpx.get(server["http"] + "/v1/list_loras").json()["merged"]
        # by registered name, at another strength
        named = _post(server, "/v1/images/generations", {**BODY, "lora": [{"name": "style", "strength": 0.5}]})
        assert np.array_equal(_image(named), explicit)
    finally:
        _post(server, "/v1/unmerge_lora_weights")
    bad = _post(server, "/v1/set_lora", {"lora_nickname": "x", "lora_path": "/etc/hostname"})
    assert bad.status_code == 400 and "outside the LoRA directory" in bad.json()["error"]["message"]


def test_grpc_lora_and_cache(server):
    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        req = generation_pb2.GenerateRequest(
            prompt="a red circle", width=48, height=32, seed=7, num_inference_steps=12,
            lora=[common_pb2.LoraAdapter(name="style", path="style.safetensors", strength=0.8)],
            cache=common_pb2.CachePolicy(preset="ultra"),
        )
        reply = stub.Generate(req, timeout=120)
        assert reply.cache_stats.cached_steps >= 1
        assert reply.cache_stats.computed_steps + reply.cache_stats.cached_steps == 12
        bad = generation_pb2.GenerateRequest(prompt="x", lora=[common_pb2.LoraAdapter(name="evil", path="/etc/passwd")])
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(bad, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "LoRA 'evil'" in err.value.details()
