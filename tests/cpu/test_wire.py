"""The wire contract: generated code in sync with protos/, tensor codec, chunking, message round trips."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.runtime import wire
from services.runtime.codec import (
    TensorAssembler,
    assemble,
    tensor_chunks,
    tensor_from_proto,
    tensor_to_proto,
)
from services.runtime.errors import InvalidRequestError
from services.runtime.messages import Conditioning, DenoiseRequest, EncodeResponse

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_protos():
    proc = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64])
def test_tensor_round_trip_is_bitwise(dtype):
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    msg = tensor_to_proto(t)
    assert msg.dtype == str(dtype).removeprefix("torch.") and list(msg.shape) == [3, 5, 7]
    assert len(msg.data) == t.numel() * t.element_size()
    back = tensor_from_proto(type(msg).FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_bfloat16_travels_as_raw_little_endian_words():
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert tensor_to_proto(t).data == bytes([0x80, 0x3F, 0x00, 0xC0])


def test_non_contiguous_and_empty_tensors():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(tensor_from_proto(tensor_to_proto(t)), t)
    assert tensor_from_proto(tensor_to_proto(torch.empty(0, 4))).shape == (0, 4)


def test_chunked_stream_reassembles():
    t = torch.randint(0, 255, (4, 33, 17, 3), dtype=torch.uint8)
    chunks = list(tensor_chunks(t, chunk_bytes=1000))
    assert len(chunks) == 1 + -(-t.numel() // 1000)
    assert all(len(c.data) <= 1000 for c in chunks)
    assert torch.equal(assemble(chunks), t)


def test_truncated_or_malformed_tensors_are_clear_errors():
    chunks = list(tensor_chunks(torch.zeros(100), chunk_bytes=64))
    asm = TensorAssembler()
    for c in chunks[:-1]:
        asm.add(c)
    with pytest.raises(InvalidRequestError, match="ended after"):
        asm.tensor()
    msg = tensor_to_proto(torch.zeros(4))
    msg.data = msg.data[:-1]
    with pytest.raises(InvalidRequestError, match="needs 16 bytes, got 15"):
        tensor_from_proto(msg)
    msg.dtype = "complex128"
    with pytest.raises(InvalidRequestError, match="unknown tensor dtype"):
        tensor_from_proto(msg)


def test_stage_messages_round_trip():
    cond = Conditioning(torch.randn(2, 7, 4).bfloat16(), torch.randn(2, 3).bfloat16())
    req = DenoiseRequest(cond, None, 64, 48, 3, 3.3, 1.0, [1, 2**40])
    back = wire.denoise_request_from_proto(wire.denoise_request_to_proto(req))
    assert back.negative is None and back.seeds == [1, 2**40] and back.guidance_scale == 3.3
    assert torch.equal(back.positive.prompt_embeds, cond.prompt_embeds)
    req.negative = cond
    assert wire.denoise_request_from_proto(wire.denoise_request_to_proto(req)).negative is not None
    resp = EncodeResponse(torch.randn(1, 5, 4), torch.randn(1, 3))
    back = wire.encode_response_from_proto(wire.encode_response_to_proto(resp))
    assert torch.equal(back.prompt_embeds, resp.prompt_embeds) and back.prompt_lengths is None
    # Qwen-Image's form: no pooled vector, rows zero-padded with their real lengths alongside
    resp = EncodeResponse(torch.randn(2, 5, 4), torch.zeros(2, 0), prompt_lengths=torch.tensor([5, 3]))
    back = wire.encode_response_from_proto(wire.encode_response_to_proto(resp))
    assert back.pooled_prompt_embeds.shape == (2, 0) and back.prompt_lengths.tolist() == [5, 3]
    assert back.image_embeds is None


def test_image_conditioning_travels_between_stages():
    """What edit and image-to-video requests add: input pixels to the encoder and to the VAE's
    Encode (with the output's size), latents and image tokens back, both on to the denoiser; a
    two-expert model's second CFG scale, unset apart from 0."""
    from services.runtime.messages import EncodeRequest, VaeEncodeRequest, VaeEncodeResponse

    pixels = [torch.randint(0, 256, (6, 8, 3), dtype=torch.uint8), torch.randint(0, 256, (4, 4, 3), dtype=torch.uint8)]
    back = wire.encode_request_from_proto(wire.encode_request_to_proto(EncodeRequest(["a"], 16, images=pixels)))
    assert all(torch.equal(a, b) for a, b in zip(back.images, pixels)) and len(back.images) == 2
    clip = EncodeResponse(torch.randn(1, 5, 4), torch.zeros(1, 0), image_embeds=torch.randn(1, 257, 8))
    assert torch.equal(wire.encode_response_from_proto(wire.encode_response_to_proto(clip)).image_embeds,
                       clip.image_embeds)
    req = VaeEncodeRequest(pixels[:1], height=480, width=832, num_frames=81)
    back = wire.vae_encode_request_from_proto(wire.vae_encode_request_to_proto(req))
    assert (back.height, back.width, back.num_frames) == (480, 832, 81) and torch.equal(back.images[0], pixels[0])
    latents = [torch.randn(16, 3, 6, 8), torch.randn(16, 2, 2)]
    back = wire.vae_encode_response_from_proto(wire.vae_encode_response_to_proto(VaeEncodeResponse(latents)))
    assert all(torch.equal(a, b) for a, b in zip(back.latents, latents))
    cond = Conditioning(torch.zeros(1, 2, 4), torch.zeros(1, 0))
    for scale_2 in (None, 0.0, 3.0):
        req = DenoiseRequest(cond, None, 64, 64, 4, 5.0, 1.0, [1], reference_latents=latents,
                             image_embeds=clip.image_embeds, guidance_scale_2=scale_2)
        back = wire.denoise_request_from_proto(wire.denoise_request_to_proto(req))
        assert back.guidance_scale_2 == scale_2 and torch.equal(back.image_embeds, clip.image_embeds)
        assert [tuple(t.shape) for t in back.reference_latents] == [(16, 3, 6, 8), (16, 2, 2)]


def test_cfg_limits_travel_from_rest_and_grpc_to_the_denoiser():
    """Z-Image's per-request cfg_normalization / cfg_truncation: the REST body and the public gRPC
    request give the same GenerateRequest, and the stage message keeps an explicit truncation
    of 0 apart from unset (1)."""
    from services.gateway.api_types import ImageGenerationBody
    from services.gateway.grpc_api import request_from_proto
    from services.runtime.proto import generation_pb2

    rest = ImageGenerationBody(prompt="x", cfg_normalization=0.8, cfg_truncation=0.0).to_generate_request()
    grpc_req = request_from_proto(generation_pb2.GenerateRequest(prompt="x", cfg_normalization=0.8, cfg_truncation=0.0))
    assert (rest.cfg_normalization, rest.cfg_truncation) == (grpc_req.cfg_normalization, grpc_req.cfg_truncation) \
        == (0.8, 0.0)
    assert request_from_proto(generation_pb2.GenerateRequest(prompt="x")).cfg_truncation is None
    cond = Conditioning(torch.zeros(1, 2, 4), torch.zeros(1, 0))
    for truncation in (0.0, 1.0, 0.3):
        req = DenoiseRequest(cond, cond, 64, 64, 4, 5.0, 1.0, [1], cfg_normalization=0.8, cfg_truncation=truncation)
        back = wire.denoise_request_from_proto(wire.denoise_request_to_proto(req))
        assert (back.cfg_normalization, back.cfg_truncation) == (0.8, truncation)
