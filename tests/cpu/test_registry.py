"""Model directory -> pipeline spec, and the spec's defaults."""

import pytest

from services.runtime.errors import ModelNotFoundError, UnsupportedModelError
from services.runtime.registry import DEFAULT_MODEL_PATH, ModelDir, resolve


def test_flux_dev_resolves_with_dev_defaults(flux_dev_dir):
    model, spec = resolve(flux_dev_dir)
    assert spec.family == "flux" and model.pipeline_class == "FluxPipeline"
    d = spec.defaults(model)
    assert (d.num_inference_steps, d.guidance_scale, d.max_sequence_length) == (28, 3.5, 512)
    assert (d.height, d.width) == (64, 64)  # the tiny VAE's sample_size (FLUX.1-dev's says 1024)
    assert spec.size_multiple(model) == 16


def test_flux_size_and_text_length_fall_back_to_diffusers_defaults(flux_dev_dir, tmp_path):
    import json
    import shutil

    copy = shutil.copytree(flux_dev_dir, tmp_path / "m")
    vae = json.loads((copy / "vae" / "config.json").read_text())
    del vae["sample_size"]
    (copy / "vae" / "config.json").write_text(json.dumps(vae))
    tok = copy / "tokenizer_2" / "tokenizer_config.json"
    tok.write_text(json.dumps({**json.loads(tok.read_text()), "model_max_length": int(1e30)}))
    model, spec = resolve(copy)
    d = spec.defaults(model)
    assert (d.height, d.width, d.max_sequence_length) == (1024, 1024, 512)  # 128 x the VAE's 8x


def test_flux_schnell_defaults(flux_schnell_dir):
    model, spec = resolve(flux_schnell_dir)
    d = spec.defaults(model)
    assert (d.num_inference_steps, d.guidance_scale, d.max_sequence_length) == (4, 0.0, 256)


def test_spec_assigns_every_component_to_one_stage(flux_dev_dir):
    model, spec = resolve(flux_dev_dir)
    stages = [*spec.encoder_components, *spec.denoiser_components, *spec.vae_components]
    assert len(stages) == len(set(stages))
    for name in stages:
        model.component_class(name)  # raises if model_index.json lacks it


def test_embedded_default_model_is_a_small_flux_checkpoint():
    model, spec = resolve(None)
    assert model.path == DEFAULT_MODEL_PATH and spec.family == "flux"
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_PATH.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    d = spec.defaults(model)  # trained at 64x64 on captions of at most 10 T5 tokens
    assert (d.height, d.width, d.max_sequence_length, d.num_inference_steps) == (64, 64, 32, 28)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        ModelDir(tmp_path / "x")
    (tmp_path / "f").write_text("")
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        ModelDir(tmp_path / "f")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="unreadable model_index.json"):
        ModelDir(tmp_path / "m")
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "MyOwnPipeline"}')
    with pytest.raises(UnsupportedModelError, match="MyOwnPipeline"):
        resolve(tmp_path / "m")
    # a native class whose directory lacks its components: the missing ones are named
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(UnsupportedModelError, match="WanPipeline needs components tokenizer, text_encoder"):
        resolve(tmp_path / "m")
