"""Native Flux transformer vs diffusers.FluxTransformer2DModel on the same weights."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from services.denoiser.latents import PackedLatents2x2
from services.denoiser.weights import load_native_transformer
from services.runtime.errors import ModelLoadError, UnsupportedModelError
from services.runtime.registry import ModelDir


def _inputs(cfg, batch, h, w, text_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = PackedLatents2x2(cfg.in_channels // 4, 8)
    x = torch.randn(batch, (h // 2) * (w // 2), cfg.in_channels, generator=g)
    ctx = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    t = torch.rand(batch, generator=g)
    guidance = torch.full((batch,), 3.5) if cfg.guidance_embeds else None
    img_ids = layout.image_ids(h, w, torch.device("cpu"))
    txt_ids = layout.text_ids(text_len, torch.device("cpu"))
    return x, ctx, pooled, t, guidance, img_ids, txt_ids


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _diffusers_forward(ref, inputs) -> torch.Tensor:
    """diffusers' FluxTransformer2DModel on _inputs' tuple."""
    x, ctx, pooled, t, guidance, img_ids, txt_ids = inputs
    return ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, img_ids=img_ids,
               txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("h,w,text_len", [(8, 8, 16), (6, 10, 13), (14, 4, 7)])
def test_matches_diffusers_fp32(variant, h, w, text_len, request):
    path = request.getfixturevalue(f"flux_{variant}_dir")
    ref = FluxTransformer2DModel.from_pretrained(path / "transformer").eval()
    native = load_native_transformer(ModelDir(path), "flux", dtype=torch.float32, device=torch.device("cpu"))
    x, ctx, pooled, t, guidance, img_ids, txt_ids = _inputs(native.config, 2, h, w, text_len)
    with torch.no_grad():
        expected = _diffusers_forward(ref, (x, ctx, pooled, t, guidance, img_ids, txt_ids))
        got = native(x, ctx, pooled, t, native.rope(txt_ids, img_ids), guidance)
    assert expected.std() > 0.1, "outputs too small to be a meaningful comparison"
    assert _rel_err(got, expected) <= 1e-5


def test_matches_diffusers_bf16(flux_dev_dir):
    ref = FluxTransformer2DModel.from_pretrained(flux_dev_dir / "transformer", torch_dtype=torch.bfloat16).eval()
    native = load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=torch.bfloat16, device=torch.device("cpu"))
    x, ctx, pooled, t, guidance, img_ids, txt_ids = _inputs(native.config, 1, 8, 6, 9)
    x, ctx, pooled = x.bfloat16(), ctx.bfloat16(), pooled.bfloat16()
    with torch.no_grad():
        expected = ref(x, ctx, pooled, t, img_ids, txt_ids, guidance, return_dict=False)[0]
        got = native(x, ctx, pooled, t, native.rope(txt_ids, img_ids), guidance)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got.float(), expected.float()) <= 1e-2


def test_weights_load_unchanged(flux_dev_dir):
    from safetensors.torch import load_file

    native = load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=torch.float32, device=torch.device("cpu"))
    on_disk = load_file(flux_dev_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    state = native.state_dict()
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k], on_disk[k]) for k in on_disk)


def test_missing_weight_is_a_clear_error(flux_dev_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "model"
    shutil.copytree(flux_dev_dir, bad)
    f = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    del state["proj_out.weight"]
    save_file(state, f)
    with pytest.raises(ModelLoadError, match="missing \\['proj_out.weight'\\]"):
        load_native_transformer(ModelDir(bad), "flux", dtype=torch.float32, device=torch.device("cpu"))


def test_wrong_transformer_class_is_rejected(flux_dev_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(flux_dev_dir, bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="SD3Transformer2DModel"):
        load_native_transformer(ModelDir(bad), "flux", dtype=torch.float32, device=torch.device("cpu"))
