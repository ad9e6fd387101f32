"""Qwen-Image-Edit and Edit-Plus served natively: the input image through the encoder's vision
tower and the VAE stage's encode, its latents' tokens attended to by the DiT; the same pixels
as diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline on the same tiny checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.runtime.errors import InvalidRequestError
from services.runtime.registry import resolve
from tests import family_checks as fc
from tests.tiny_families import qwen_vl_processor


def _png(width: int, height: int, seed: int) -> bytes:
    """A smooth random picture (a VAE of random weights still sees structure in it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def edit_pipe(qwen_image_edit_dir):
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline.from_pretrained(qwen_image_edit_dir,
                                                 processor=qwen_vl_processor(qwen_image_edit_dir / "processor"))


def test_edit_with_true_cfg_matches_diffusers(qwen_image_edit_dir, edit_pipe):
    image = _png(64, 48, 0)
    kwargs = dict(prompt="make the sky green", negative_prompt="blurry", true_cfg_scale=4.0, height=48, width=80,
                  num_inference_steps=2)
    result = fc.generate(fc.router(qwen_image_edit_dir), seed=3, n=2, images=[image], **kwargs)
    fc.assert_same(fc.pixels(result), fc.diffusers_pixels(edit_pipe, [3, 4], image=_pil(image), **kwargs))
    assert "vae_encode" in result.stages


def test_default_size_follows_the_input_image_and_bad_input_is_refused(qwen_image_edit_dir):
    model, spec = resolve(qwen_image_edit_dir)
    assert spec.family == "qwen_image_edit" and spec.image_conditioning is not None
    router = fc.router(qwen_image_edit_dir)
    from services.runtime.config import GenerateRequest

    # QwenImageEditPipeline's calculate_dimensions(1024 * 1024, 64 / 48): 1184 x 896
    resolved = router.resolve(GenerateRequest(prompt="x", images=[_png(64, 48, 1)]))
    assert (resolved.width, resolved.height) == (1184, 896)
    with pytest.raises(InvalidRequestError, match="needs an input image"):
        router.resolve(GenerateRequest(prompt="x"))
    with pytest.raises(InvalidRequestError, match="one input image"):
        router.resolve(GenerateRequest(prompt="x", images=[_png(32, 32, 1), _png(32, 32, 2)]))
    with pytest.raises(InvalidRequestError, match="not an image"):
        router.resolve(GenerateRequest(prompt="x", images=[b"not a png"]))
    with pytest.raises(InvalidRequestError, match="vision tokens"):
        fc.generate(router, prompt="a <|image_pad|> b", images=[_png(32, 32, 1)], height=32, width=32,
                    num_inference_steps=1)


def test_edit_plus_with_two_images_matches_diffusers(qwen_image_edit_plus_dir):
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(
        qwen_image_edit_plus_dir, processor=qwen_vl_processor(qwen_image_edit_plus_dir / "processor"))
    images = [_png(48, 64, 5), _png(80, 40, 6)]  # different aspect ratios: different token grids
    kwargs = dict(prompt="put the first picture's object in the second", height=32, width=48, num_inference_steps=2)
    result = fc.generate(fc.router(qwen_image_edit_plus_dir), seed=11, images=images, **kwargs)
    fc.assert_same(fc.pixels(result), fc.diffusers_pixels(pipe, [11], image=[_pil(i) for i in images], **kwargs))


@pytest.mark.parametrize("parallel", [dict(ulysses_degree=2), dict(cfg_parallel=True)], ids=["ulysses2", "cfg2"])
def test_parallel_replicas_give_single_rank_pixels(qwen_image_edit_dir, parallel):
    # The sequence the ranks split is [text; noise; input image]; 48x80 is a 3x5 noise grid.
    fc.check_parallel_replica(qwen_image_edit_dir, parallel, prompt="a red circle", negative_prompt="dark",
                              true_cfg_scale=3.0, height=48, width=80, num_inference_steps=2, seed=5,
                              images=[_png(64, 48, 0)])


def test_edits_api_over_grpc_workers_gives_the_in_process_pixels(qwen_image_edit_dir):
    """Encoder, denoiser and VAE as separate `ditserve worker` processes: the input image crosses
    the wire to the encoder and the VAE's Encode, the latents to the denoiser; OpenAI's
    images.edit and the public gRPC Generate return what the in-process stages make."""
    import base64

    import grpc
    import openai

    from services.runtime.proto import generation_pb2, generation_pb2_grpc
    from tests.servers import disaggregated

    image = _png(64, 48, 0)
    request = dict(prompt="make the sky green", height=48, width=80, num_inference_steps=2, seed=9)
    expected = fc.pixels(fc.generate(fc.router(qwen_image_edit_dir), images=[image], **request))[0]
    with disaggregated(qwen_image_edit_dir) as urls:
        client = openai.OpenAI(base_url=urls["http"] + "/v1", api_key="unused")
        resp = client.images.edit(image=("in.png", image, "image/png"), prompt=request["prompt"], size="80x48",
                                  response_format="b64_json", extra_body={"seed": 9, "num_inference_steps": 2})
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json))).convert("RGB"))
        np.testing.assert_array_equal(got, expected)
        with grpc.insecure_channel(urls["grpc"]) as channel:
            reply = generation_pb2_grpc.GenerationStub(channel).Generate(generation_pb2.GenerateRequest(
                prompt=request["prompt"], width=80, height=48, seed=9, num_inference_steps=2, input_images=[image]))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(reply.images[0].data)).convert("RGB")), expected)
        with grpc.insecure_channel(urls["grpc"]) as channel, pytest.raises(grpc.RpcError) as err:
            generation_pb2_grpc.GenerationStub(channel).Generate(generation_pb2.GenerateRequest(prompt="no image"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs an input image" in err.value.details()


def _with_transformer_option(src, dst, **options):
    import json
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "transformer" / "config.json").read_text())
    (dst / "transformer" / "config.json").write_text(json.dumps({**config, **options}))
    return dst


def test_unserved_variants_go_to_the_diffusers_backend(qwen_image_edit_dir, tmp_path):
    """Qwen-Image-Layered's 3-D RoPE is not in the native DiT: `auto` serves such a directory
    whole through diffusers, and `--backend native` says why it cannot."""
    from services.runtime.errors import UnsupportedModelError

    path = _with_transformer_option(qwen_image_edit_dir, tmp_path / "layered", use_layer3d_rope=True)
    assert resolve(path)[1].whole_pipeline
    with pytest.raises(UnsupportedModelError, match="use_layer3d_rope"):
        resolve(path, "native")
    assert not resolve(qwen_image_edit_dir)[1].whole_pipeline


@pytest.fixture(scope="module")
def edit_2511_dir(qwen_image_edit_plus_dir, tmp_path_factory):
    """Qwen-Image-Edit-2511's layout: Edit-Plus's pipeline, a DiT with zero_cond_t (the input
    images' tokens modulated as at timestep 0; no extra weights)."""
    return _with_transformer_option(qwen_image_edit_plus_dir, tmp_path_factory.mktemp("edit-2511") / "model",
                                    zero_cond_t=True)


def test_zero_cond_t_module_matches_diffusers(edit_2511_dir):
    import torch
    from diffusers import QwenImageTransformer2DModel

    from services.denoiser.latents import CenteredLatents2x2
    from services.denoiser.weights import load_native_transformer
    from services.runtime.registry import ModelDir

    ref = QwenImageTransformer2DModel.from_pretrained(edit_2511_dir / "transformer").eval()
    assert ref.config.zero_cond_t
    native = load_native_transformer(ModelDir(edit_2511_dir), "qwen_image", dtype=torch.float32,
                                     device=torch.device("cpu"))
    layout, cpu, g = CenteredLatents2x2(4, 8), torch.device("cpu"), torch.Generator().manual_seed(0)
    (h, w), refs = (6, 10), ((8, 4), (4, 6))  # latent grids: the output's, then two input images'
    n = [(a // 2) * (b // 2) for a, b in ((h, w), *refs)]
    x, ctx, t = torch.randn(2, sum(n), 16, generator=g), torch.randn(2, 7, 16, generator=g), torch.rand(2, generator=g)
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t, return_dict=False,
                       img_shapes=[[(1, a // 2, b // 2) for a, b in ((h, w), *refs)]] * 2)[0]
        reference = torch.arange(sum(n)) >= n[0]
        rope = layout.rope(native, 7, (h, w), cpu, references=refs)
        got = native(x, ctx, None, t, rope, reference_tokens=reference)
        plain = native(x, ctx, None, t, rope)
        # the request's modulation table holds the input images' (timestep 0) rows too
        tabulated = native(x, ctx, None, t, rope, reference_tokens=reference,
                           modulations=native.modulation_table(t, None, None, torch.float32))
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5
    assert ((tabulated - got).norm() / got.norm()).item() <= 1e-6
    assert (plain - expected).abs().max() > 1e-3  # the input images' own modulation matters


def test_edit_2511_layout_matches_diffusers(edit_2511_dir):
    from diffusers import QwenImageEditPlusPipeline

    assert not resolve(edit_2511_dir)[1].whole_pipeline
    pipe = QwenImageEditPlusPipeline.from_pretrained(edit_2511_dir,
                                                     processor=qwen_vl_processor(edit_2511_dir / "processor"))
    images = [_png(80, 40, 6)]  # (two input images: the module test above and the Edit-Plus one)
    kwargs = dict(prompt="make the sky green", negative_prompt="blurry", true_cfg_scale=4.0, height=32, width=48,
                  num_inference_steps=2)
    result = fc.generate(fc.router(edit_2511_dir), seed=12, images=images, **kwargs)
    fc.assert_same(fc.pixels(result), fc.diffusers_pixels(pipe, [12], image=[_pil(i) for i in images], **kwargs))
    # sharded: each rank's tokens mix the output's and the input images' (split unevenly)
    fc.check_parallel_replica(edit_2511_dir, dict(ulysses_degree=2), seed=12, images=images, **kwargs)
