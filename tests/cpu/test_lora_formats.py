"""LoRA files in every layout formats.py reads, checked against diffusers' own loader.

Oracle: FluxPipeline.load_lora_weights + set_adapters(weight 0.7), then pipe.transformer on fixed
inputs. Ours: read_lora, then the native transformer with 0.7 x delta merged into each weight.
Where diffusers cannot load a case as is, the comment at the test says what the oracle is instead."""

import copy
import dataclasses
import inspect
import json
import logging
import textwrap

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.loaders import lora_conversion_utils, lora_pipeline
from safetensors.torch import load_file

from services.denoiser.lora.formats import convert_lora, flux_module_shapes, read_lora
from services.denoiser.models.flux import FluxConfig
from services.denoiser.weights import load_native_transformer
from services.runtime.errors import InvalidRequestError
from services.runtime.registry import ModelDir
from tests.cpu.test_flux_module import _diffusers_forward, _inputs, _rel_err
from tests.lora_files import flux_lora_state, text_encoder_lora_state, write_lora

STRENGTH = 0.7


@pytest.fixture(scope="module")
def native(flux_dev_dir):
    return load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def inputs(native):
    return _inputs(native.config, 2, 8, 6, 9)


@pytest.fixture
def tiny_diffusers_converters(monkeypatch, native):
    """diffusers' kohya and BFL converters hard-code Flux.1's sizes (19/38 blocks, d=3072); the
    same functions, those constants set to the tiny model's, so their logic is the oracle."""
    cfg = native.config
    d, blocks, single = cfg.inner_dim, cfg.num_layers, cfg.num_single_layers

    def patched(fn, replacements):
        src = textwrap.dedent(inspect.getsource(fn))
        for old, new in replacements.items():
            assert old in src, f"diffusers changed {fn.__name__}: no {old!r}"
            src = src.replace(old, new)
        namespace = dict(fn.__globals__)
        exec(src, namespace)  # noqa: S102 - diffusers' own source with its size constants replaced
        return namespace[fn.__name__]

    kohya = patched(
        lora_conversion_utils._convert_kohya_flux_lora_to_diffusers,
        {"dims=[3072, 3072, 3072, 12288]": f"dims=[{d}, {d}, {d}, {4 * d}]"},
    )
    bfl = patched(
        lora_conversion_utils._convert_bfl_flux_control_lora_to_diffusers,
        {
            "num_layers = 19": f"num_layers = {blocks}",
            "num_single_layers = 38": f"num_single_layers = {single}",
            "inner_dim = 3072": f"inner_dim = {d}",
        },
    )
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", kohya)
    monkeypatch.setattr(lora_pipeline, "_convert_bfl_flux_control_lora_to_diffusers", bfl)


def _diffusers_out(model_dir, lora, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(with the LoRA at STRENGTH, without it); `lora` a file or a state dict."""
    pipe = FluxPipeline.from_pretrained(model_dir)

    def run():
        with torch.no_grad():
            return _diffusers_forward(pipe.transformer, inputs)

    base = run()
    pipe.load_lora_weights(lora, adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[STRENGTH])
    return run(), base


def _native_out(native, adapter, inputs) -> torch.Tensor:
    x, ctx, pooled, t, guidance, img_ids, txt_ids = inputs
    model = copy.deepcopy(native)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, w in adapter.weights.items():
            modules[path].weight += STRENGTH * w.delta()
        return model(x, ctx, pooled, t, model.rope(txt_ids, img_ids), guidance)


def _check(native, adapter, inputs, model_dir, oracle):
    expected, base = _diffusers_out(model_dir, oracle, inputs)
    assert _rel_err(base, expected) > 0.01, "the LoRA barely changes diffusers' output: a weak test"
    assert _rel_err(_native_out(native, adapter, inputs), expected) <= 1e-5


def _with_prefix(state, prefix="transformer."):
    return {prefix + k: v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# each layout against diffusers


def _header_alphas(state, rank=4):
    """The .alpha keys of a diffusers-layout state moved into peft's LoraConfig in the file header,
    one anchored alpha_pattern entry per module: (state without alphas, safetensors metadata)."""
    alphas = {
        k.removeprefix("transformer.").removesuffix(".alpha"): float(v)
        for k, v in state.items()
        if k.endswith(".alpha")
    }
    config = {
        "r": rank,
        "lora_alpha": rank,
        "alpha_pattern": {f"^{m}": a for m, a in alphas.items()},
        "target_modules": sorted(alphas),
    }
    header = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    return {k: v for k, v in state.items() if not k.endswith(".alpha")}, header


def test_diffusers_layout_with_alphas(native, inputs, flux_dev_dir, tmp_path):
    path = write_lora(tmp_path / "a.safetensors", flux_lora_state(native.config, "diffusers"))
    adapter = read_lora(path, "a", native.config)
    assert len({w.scale for w in adapter.weights.values()}) > 1
    _check(native, adapter, inputs, flux_dev_dir, path)


def test_diffusers_layout_embedders_and_final_layer(native, inputs, flux_dev_dir, tmp_path):
    # diffusers turns .alpha keys into a peft alpha_pattern whose keys match as name suffixes: the
    # top-level proj_out's alpha then also lands on every single block's proj_out (a diffusers
    # bug we do not copy). Oracle: the same alphas, anchored, in the header config diffusers reads.
    state = flux_lora_state(native.config, "diffusers", top_level=True)
    adapter = read_lora(write_lora(tmp_path / "a.safetensors", state), "a", native.config)
    assert adapter.weights.keys() == flux_module_shapes(native.config).keys()
    assert adapter.weights["proj_out"].scale != adapter.weights["single_transformer_blocks.0.proj_out"].scale
    oracle = write_lora(tmp_path / "oracle.safetensors", *_header_alphas(state))
    _check(native, adapter, inputs, flux_dev_dir, oracle)


def test_diffusers_layout_alphas_in_header(native, inputs, flux_dev_dir, tmp_path):
    # diffusers' training scripts write peft's LoraConfig into the safetensors header instead of
    # .alpha keys; its patterns match name suffixes (peft's rule, which we follow for the header).
    state = {k: v for k, v in flux_lora_state(native.config, "diffusers").items() if not k.endswith(".alpha")}
    config = {
        "r": 4,
        "lora_alpha": 8,
        "alpha_pattern": {"proj_out": 2, "^transformer_blocks.1.ff.net.2": 6},
        "target_modules": sorted({k.split(".lora_")[0].removeprefix("transformer.") for k in state}),
    }
    header = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    path = write_lora(tmp_path / "a.safetensors", state, metadata=header)
    adapter = read_lora(path, "a")
    scales = {
        m: adapter.weights[m].scale
        for m in (
            "single_transformer_blocks.1.proj_out",
            "transformer_blocks.1.ff.net.2",
            "transformer_blocks.0.ff.net.2",
        )
    }
    assert scales == {
        "single_transformer_blocks.1.proj_out": 0.5,
        "transformer_blocks.1.ff.net.2": 1.5,
        "transformer_blocks.0.ff.net.2": 2.0,
    }
    _check(native, adapter, inputs, flux_dev_dir, path)


def test_peft_layout_without_prefix(native, inputs, flux_dev_dir, tmp_path):
    # `.lora_A.default.weight` keys with no `transformer.` prefix (a peft-wrapped model's own
    # state_dict): diffusers loads nothing from it (its loader keeps `transformer.` keys only),
    # so the oracle is diffusers on the same weights named its way.
    state = flux_lora_state(native.config, "peft")
    adapter = read_lora(write_lora(tmp_path / "a.safetensors", state), "a")
    oracle = _with_prefix({k.replace(".default.", "."): v for k, v in state.items()})
    _check(native, adapter, inputs, flux_dev_dir, oracle)


@pytest.mark.parametrize("layout", ["kohya", "comfy"])
def test_kohya_layout(layout, native, inputs, flux_dev_dir, tmp_path, tiny_diffusers_converters, caplog):
    # Block modules: fused qkv -> q/k/v, linear1 -> q/k/v/mlp, modulations; per-module alphas;
    # text-encoder keys beside them (diffusers loads those into CLIP, we skip them with a warning).
    state = flux_lora_state(native.config, layout) | text_encoder_lora_state(hidden=32, intermediate=37)
    path = write_lora(tmp_path / "a.safetensors", state)
    with caplog.at_level(logging.WARNING, "services.denoiser.lora.formats"):
        adapter = read_lora(path, "a", native.config)
    assert "skipped 18 text-encoder weights" in caplog.text
    assert "single_transformer_blocks.1.proj_mlp" in adapter.weights
    _check(native, adapter, inputs, flux_dev_dir, path)


def test_kohya_embedders_and_final_layer(native, inputs, flux_dev_dir, tmp_path, tiny_diffusers_converters):
    # diffusers converts kohya's img_in/txt_in/time_in/vector_in/guidance_in/final_layer but names
    # them without `transformer.`, so its loader then drops them; and it ignores the final layer's
    # alphas. Oracle: diffusers' own conversion, those keys given the prefix, final-layer alphas = rank
    # (where the two rules agree; our alpha rule for them is checked below).
    state = flux_lora_state(native.config, "kohya", top_level=True)
    for k in state:
        if k.startswith("lora_unet_final_layer") and k.endswith(".alpha"):
            state[k] = torch.tensor(4.0)
    path = write_lora(tmp_path / "a.safetensors", state)
    adapter = read_lora(path, "a", native.config)
    converted = FluxPipeline.lora_state_dict(str(path))
    oracle = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
    assert {"x_embedder", "norm_out.linear", "time_text_embed.guidance_embedder.linear_2"} <= adapter.weights.keys()
    _check(native, adapter, inputs, flux_dev_dir, oracle)

    state["lora_unet_final_layer_adaLN_modulation_1.alpha"] = torch.tensor(8.0)
    assert convert_lora(state, "a").weights["norm_out.linear"].scale == 2.0  # sd-scripts' and ComfyUI's rule


def test_bfl_layout(native, inputs, flux_dev_dir, tmp_path, tiny_diffusers_converters):
    # diffusers reads BFL's own names only as a whole Control LoRA: every module plus the QK-norm
    # scales it replaces. The oracle file adds the model's own norm scales (a no-op replacement).
    # diffusers' converter also swaps the halves of the final modulation's *down* factor, which
    # permutes rank components, not outputs (a bug; its kohya converter swaps the up factor only):
    # the oracle file holds that factor pre-swapped, so diffusers ends up with the file's own.
    state = flux_lora_state(native.config, "bfl", top_level=True)
    adapter = read_lora(write_lora(tmp_path / "a.safetensors", state), "a", native.config)
    weights = load_file(flux_dev_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    norms = {}  # BFL's QK-norm scales, holding the model's own weights
    for i in range(native.config.num_layers):
        for stream, added in (("img", ""), ("txt", "added_")):
            for q, bfl_q in (("q", "query"), ("k", "key")):
                ours = weights[f"transformer_blocks.{i}.attn.norm_{added}{q}.weight"]
                norms[f"double_blocks.{i}.{stream}_attn.norm.{bfl_q}_norm.scale"] = ours
    for i in range(native.config.num_single_layers):
        for q, bfl_q in (("q", "query"), ("k", "key")):
            ours = weights[f"single_transformer_blocks.{i}.attn.norm_{q}.weight"]
            norms[f"single_blocks.{i}.norm.{bfl_q}_norm.scale"] = ours
    down = state["final_layer.adaLN_modulation.1.lora_A.weight"]
    norms["final_layer.adaLN_modulation.1.lora_A.weight"] = torch.cat(down.chunk(2)[::-1])
    oracle = write_lora(tmp_path / "control.safetensors", state | norms)
    _check(native, adapter, inputs, flux_dev_dir, oracle)


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_layout(prefix, native, inputs, flux_dev_dir, tmp_path):
    state = _with_prefix(flux_lora_state(native.config, "xlabs"), prefix)
    path = write_lora(tmp_path / "a.safetensors", state)
    adapter = read_lora(path, "a", native.config)
    assert {w.scale for w in adapter.weights.values()} == {1.0}
    _check(native, adapter, inputs, flux_dev_dir, path)


def test_comfy_and_fal_prefixes(native):
    # diffusers reads BFL names under these prefixes only as whole Control LoRAs (above); the
    # prefixes themselves carry no meaning, so the adapter must be the unprefixed one.
    state = flux_lora_state(native.config, "bfl", top_level=True)
    plain = convert_lora(state, "a").weights
    for prefix in ("diffusion_model.", "base_model.model."):
        prefixed = convert_lora(_with_prefix(state, prefix), "a").weights
        assert prefixed.keys() == plain.keys()
        assert all(torch.equal(prefixed[k].delta(), w.delta()) for k, w in plain.items())


# ---------------------------------------------------------------------------------------------
# errors: each names the adapter


def test_unreadable_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file" * 4)
    for path in (junk, tmp_path / "missing.safetensors"):
        with pytest.raises(InvalidRequestError, match="LoRA 'bad': cannot read"):
            read_lora(path, "bad")


def test_unknown_layouts_are_errors(native):
    sdxl = {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4),
    }
    with pytest.raises(InvalidRequestError, match="LoRA 'sdxl': unrecognised keys.*input_blocks"):
        convert_lora(sdxl, "sdxl")
    with pytest.raises(InvalidRequestError, match="LoRA 'w': unrecognised keys.*model.weight"):
        convert_lora({"model.weight": torch.zeros(2, 2)}, "w")
    # A Flux Control LoRA also replaces norm weights, which an adapter cannot express.
    control = flux_lora_state(native.config, "bfl") | {"double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16)}
    with pytest.raises(InvalidRequestError, match="LoRA 'c': unrecognised keys.*query_norm.scale"):
        convert_lora(control, "c")
    with pytest.raises(InvalidRequestError, match="LoRA 'te': targets nothing in the transformer"):
        convert_lora(text_encoder_lora_state(32, 37), "te")


def test_broken_pairs_are_errors(native):
    state = flux_lora_state(native.config, "kohya")
    half = {k: v for k, v in state.items() if k != "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"}
    with pytest.raises(InvalidRequestError, match="LoRA 'k': .*img_attn_qkv has a down weight but no up"):
        convert_lora(half, "k")
    uneven = state | {"lora_unet_single_blocks_1_linear2.lora_up.weight": torch.zeros(32, 3)}
    with pytest.raises(InvalidRequestError, match=r"LoRA 'k': .*linear2: down \(4, 160\) and up \(32, 3\)"):
        convert_lora(uneven, "k")
    twice = state | {
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, 32),
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(32, 4),
    }
    with pytest.raises(InvalidRequestError, match="LoRA 'k': transformer_blocks.0.attn.to_k is targeted twice"):
        convert_lora(twice, "k")


def test_lora_must_fit_the_model(native, flux_schnell_dir, tmp_path):
    # A dev LoRA with a guidance-embedder part, on schnell (which has none).
    path = write_lora(tmp_path / "dev.safetensors", flux_lora_state(native.config, "kohya", top_level=True))
    schnell = FluxConfig.from_dict(ModelDir(flux_schnell_dir).component_config("transformer"))
    with pytest.raises(InvalidRequestError, match="LoRA 'dev': targets time_text_embed.guidance_embedder"):
        read_lora(path, "dev", schnell)
    # A LoRA for a wider model.
    wide = dataclasses.replace(native.config, num_attention_heads=3)
    path = write_lora(tmp_path / "wide.safetensors", flux_lora_state(wide, "diffusers"))
    with pytest.raises(InvalidRequestError, match=r"LoRA 'wide': .* is \(32, 32\) but the LoRA gives \(48, 48\)"):
        read_lora(path, "wide", module_shapes=flux_module_shapes(native.config))
