"""Tensor parallelism of the T5 text encoder on CPU ranks (gloo): the sharded T5 gives the
unsharded output to fp32 relative error <= 1e-5, an encoder replica over 2 ranks gives the
single-rank embeddings (in-process, behind `ditserve worker --tp-size`, and as pixels through a
served request), a degree the model cannot be split into is refused before any rank starts, and
a dead rank fails one request cleanly and the replica is rebuilt."""

import asyncio
import base64
import copy
import io
import os
import re
import time

import httpx
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from transformers import T5Config, T5EncoderModel

from services.cli import EXIT_BAD_INPUT, build_in_process_router, build_parser, main, serve_config_from_args
from services.encoder.stage import EncoderStage
from services.encoder.t5_parallel import shard_t5
from services.runtime.config import EncoderConfig, GenerateRequest, ServeConfig, StageConfig
from services.runtime.errors import InvalidRequestError, StageUnavailableError
from services.runtime.grpc_client import GrpcEncoderClient
from services.runtime.messages import EncodeRequest
from services.runtime.tensor_parallel import ColumnParallelLinear, RowParallelLinear, TensorParallel
from tests.servers import free_port, start_serve, start_worker

PROMPTS = ["a red circle on a dark background", "a cat"]


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def _t5_rank(rank: int, world: int, port: int, feed_forward_proj: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # every rank builds the same full model
        model = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=36, num_layers=2, num_heads=4,
                                        relative_attention_num_buckets=8, feed_forward_proj=feed_forward_proj,
                                        is_encoder_decoder=False)).eval()
        ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(ids).last_hidden_state
            sharded = shard_t5(copy.deepcopy(model), TensorParallel(dist.group.WORLD))
            got = sharded(ids).last_hidden_state
        err = _rel_err(got, expected)
        assert err <= 1e-5, f"rank {rank} {feed_forward_proj}: relative error {err:.2e}"
        # This rank holds 1/world of every attention and feed-forward weight, and the bias table's heads.
        linears = lambda m, types: sum(p.numel() for x in m.modules() if isinstance(x, types) for p in x.parameters())
        full = linears(model, torch.nn.Linear)
        assert linears(sharded, (ColumnParallelLinear, RowParallelLinear)) * world == full
        table = sharded.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert table.shape == (8, 4 // world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])  # T5DenseGatedActDense, T5DenseActDense
def test_sharded_t5_matches_unsharded(feed_forward_proj):
    mp.spawn(_t5_rank, args=(2, free_port(), feed_forward_proj), nprocs=2, join=True)


def _config(model_dir, **options) -> EncoderConfig:
    return EncoderConfig(model_path=model_dir, device="cpu", dtype="float32", **options)


@pytest.fixture(scope="module")
def single_rank(flux_tp_dir):
    return EncoderStage(_config(flux_tp_dir)).encode(EncodeRequest(prompts=PROMPTS, max_sequence_length=24))


def _assert_same_embeddings(got, expected):
    assert _rel_err(got.prompt_embeds, expected.prompt_embeds) <= 1e-5
    assert torch.equal(got.pooled_prompt_embeds, expected.pooled_prompt_embeds)  # CLIP is not split


def _pixels(router) -> np.ndarray:
    request = GenerateRequest(prompt=PROMPTS[0], height=64, width=64, seed=3, num_inference_steps=2)
    return asyncio.run(router.generate(request)).images[0].pixels.astype(int)


def test_encoder_replica_over_two_ranks_gives_single_rank_embeddings_and_pixels(flux_tp_dir, single_rank):
    """As `ditserve generate --encoder-tp-size 2` builds it: the encoder group in this process."""
    stage = StageConfig(model_path=flux_tp_dir, device="cpu", dtype="float32")
    router = build_in_process_router(stage, encoder_options={"tp_size": 2})
    group = router.encoder.stage
    try:
        _assert_same_embeddings(group.encode(EncodeRequest(prompts=PROMPTS, max_sequence_length=24)), single_rank)
        pixels = _pixels(router)
    finally:
        group.close()
    assert np.abs(pixels - _pixels(build_in_process_router(stage))).max() <= 1


def test_dead_rank_fails_one_request_cleanly_and_the_replica_is_rebuilt(flux_tp_dir, single_rank):
    group = EncoderStage(_config(flux_tp_dir, tp_size=2))
    request = EncodeRequest(prompts=PROMPTS, max_sequence_length=24)
    try:
        group.ranks.kill_rank(1)
        deadline = time.monotonic() + 10
        while not group.ranks.dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(StageUnavailableError, match="encoder rank.*restarted"):
            group.encode(request)
        _assert_same_embeddings(group.encode(request), single_rank)  # served by the new ranks
    finally:
        group.close()


@pytest.mark.parametrize("tp_size,message", [(2, "d_ff \\(37\\)"), (3, "num_heads \\(4\\)")])
def test_degree_the_t5_cannot_take_is_refused_before_any_rank_starts(flux_dev_dir, tp_size, message):
    # The default tiny checkpoint's T5: 4 heads, d_ff 37.
    with pytest.raises(InvalidRequestError, match=f"encoder --tp-size {tp_size} does not divide the T5 encoder's "
                                                  f"{message}"):
        EncoderStage(_config(flux_dev_dir, tp_size=tp_size))


def test_bad_degree_is_one_line_from_the_cli(flux_dev_dir, tmp_path, capsys):
    assert main(["worker", "--role", "encoder", "--model-path", str(flux_dev_dir), "--tp-size", "3"]) == EXIT_BAD_INPUT
    assert "does not divide the T5 encoder's num_heads (4)" in capsys.readouterr().err
    assert main(["generate", "--model-path", str(flux_dev_dir), "--prompt", "x", "--encoder-tp-size", "2",
                 "--output", str(tmp_path / "o.png")]) == EXIT_BAD_INPUT
    assert "does not divide the T5 encoder's d_ff (37)" in capsys.readouterr().err


def test_multi_rank_encoder_and_denoiser_in_one_process_are_refused_before_loading(flux_tp_dir):
    with pytest.raises(InvalidRequestError, match="cannot share one process"):
        build_in_process_router(StageConfig(model_path=flux_tp_dir, device="cpu"), denoiser_options={"tp_size": 2},
                                encoder_options={"tp_size": 2})


def test_encoder_tp_in_the_serve_config_flags_and_ray_options():
    args = build_parser().parse_args(["serve", "--encoder-tp-size", "2"])
    config = serve_config_from_args(args)
    assert config.stage_config("encoder").tp_size == 2 and config.denoiser.tp_size == 1
    # Under Ray a 2-rank encoder replica owns one bundle per rank, packed on one node.
    opts = ServeConfig(encoder={"tp_size": 2, "num_gpus": 1}).encoder.ray_options()
    assert opts["placement_group_bundles"] == [{"CPU": 0.01, "GPU": 1}] * 2
    assert opts["placement_group_strategy"] == "STRICT_PACK"


def test_tensor_parallel_encoder_worker_behind_serve_gives_single_rank_pixels(flux_tp_dir, single_rank):
    """`ditserve worker --role encoder --tp-size 2` over gRPC: the same embeddings, and a served
    request through it the same pixels as an all-single-rank pipeline."""
    worker, port = start_worker("encoder", flux_tp_dir, extra=["--tp-size", "2", "--dtype", "float32"])
    serve = None
    try:
        async def encode():  # the gRPC channel belongs to the loop that makes it
            client = GrpcEncoderClient(f"127.0.0.1:{port}")
            try:
                return await client.encode(EncodeRequest(prompts=PROMPTS, max_sequence_length=24))
            finally:
                await client.close()

        _assert_same_embeddings(asyncio.run(encode()), single_rank)
        serve, http_port, _ = start_serve(flux_tp_dir, "--dtype", "float32", f"--encoder-address=127.0.0.1:{port}")
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/images/generations", timeout=120,
                       json={"prompt": PROMPTS[0], "size": "64x64", "num_inference_steps": 2, "seed": 3})
        assert r.status_code == 200, r.text
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))).astype(int)
    finally:
        for proc in (serve, worker):
            if proc is not None:
                proc.kill()
    assert np.abs(pixels - _pixels(build_in_process_router(StageConfig(model_path=flux_tp_dir, device="cpu",
                                                                     dtype="float32")))).max() <= 1


@pytest.mark.parametrize("fixture,name", [("qwen_image_dir", "Qwen-Image's Qwen2.5-VL"),
                                          ("z_image_dir", "Z-Image's Qwen3")])
def test_encoders_without_tensor_parallelism_refuse_it_before_any_rank_starts(fixture, name, request):
    with pytest.raises(InvalidRequestError, match=f"implemented for T5 encoders only, not {re.escape(name)}") as err:
        EncoderStage(EncoderConfig(model_path=request.getfixturevalue(fixture), device="cpu", tp_size=2))
    assert err.value.param == "tp_size"
