"""Per-request LoRA end to end: pixels against diffusers' load_lora_weights + set_adapters,
merged and unmerged (mixed-batch) execution, path safety, and bad adapters refused with the
adapter named. Format conversion itself: test_lora_formats.py."""

import asyncio
import os

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from services.cli import build_in_process_router, main
from services.denoiser.stage import DenoiserStage
from services.router.loras import lora_resolver
from services.runtime.config import DenoiserConfig, GenerateRequest, StageConfig
from services.runtime.errors import InvalidRequestError
from services.runtime.messages import AdapterRef, Conditioning, DenoiseRequest
from services.runtime.registry import ModelDir, resolve
from tests.lora_files import flux_lora_state, write_lora

KW = dict(height=48, width=64, num_inference_steps=3, guidance_scale=3.5)


@pytest.fixture(scope="module")
def lora_dir(flux_dev_dir, tmp_path_factory):
    config = ModelDir(flux_dev_dir).component_config("transformer")
    d = tmp_path_factory.mktemp("loras")
    write_lora(d / "style.safetensors", flux_lora_state(config, "diffusers", rank=4, seed=1))
    write_lora(d / "sub" / "xlabs.safetensors", flux_lora_state(config, "xlabs", rank=2, seed=2))
    write_lora(d / "kohya.safetensors", flux_lora_state(config, "kohya", rank=3, seed=3))
    return d


def _pixels(router, **kw):
    return asyncio.run(router.generate(GenerateRequest(**KW, **kw))).images[0].pixels.astype(int)


def test_stacked_loras_match_diffusers_pixels(flux_dev_dir, lora_dir):
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))
    loras = [dict(name="style", path=str(lora_dir / "style.safetensors"), strength=0.7),
             dict(name="xl", path=str(lora_dir / "sub" / "xlabs.safetensors"), strength=0.4)]
    got = _pixels(router, prompt="a red circle", seed=5, lora=loras)
    plain = _pixels(router, prompt="a red circle", seed=5)

    pipe = FluxPipeline.from_pretrained(flux_dev_dir, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(lora_dir / "style.safetensors"), adapter_name="style")
    pipe.load_lora_weights(str(lora_dir / "sub" / "xlabs.safetensors"), adapter_name="xl")
    pipe.set_adapters(["style", "xl"], adapter_weights=[0.7, 0.4])
    expected = pipe(prompt="a red circle", generator=[torch.Generator().manual_seed(5)], output_type="np", **KW)
    expected = (expected.images[0] * 255).round().astype(int)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(got - plain).mean() > 2  # the adapters did something
    # the merged weights were restored: the same request without LoRA is the plain image again
    assert np.array_equal(_pixels(router, prompt="a red circle", seed=5), plain)


def _denoise_request(stage, loras, seeds, steps=2):
    cfg = stage.runner.model.config
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(len(seeds), 7, cfg.joint_attention_dim, generator=g),
                        torch.randn(len(seeds), cfg.pooled_projection_dim, generator=g))
    return DenoiseRequest(positive=cond, negative=None, height=32, width=48, num_inference_steps=steps,
                          guidance_scale=3.5, true_cfg_scale=1.0, seeds=seeds, loras=loras)


def test_mixed_batch_equals_each_request_alone(flux_dev_dir, lora_dir):
    """Unmerged per-sample updates: each image of a batch mixing LoRA sets equals that image run
    alone (where its set is merged into the weights)."""
    stage = DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))
    style = AdapterRef("style", str(lora_dir / "style.safetensors"), 0.7)
    xl = AdapterRef("xl", str(lora_dir / "sub" / "xlabs.safetensors"), 1.0)
    kohya = AdapterRef("k", str(lora_dir / "kohya.safetensors"), 0.5)
    sets = [[style], [], [xl, kohya], [style, xl]]
    weights_before = {k: v.clone() for k, v in stage.runner.model.state_dict().items()}
    batch = stage.denoise(_denoise_request(stage, sets, [1, 2, 3, 4])).latents
    assert stage.lora.merged_key == ()  # mixed: nothing merged
    for i, loras in enumerate(sets):
        req = _denoise_request(stage, [loras] if loras else [], [1, 2, 3, 4])
        req.positive = Conditioning(req.positive.prompt_embeds[i : i + 1], req.positive.pooled_prompt_embeds[i : i + 1])
        req.seeds = [i + 1]
        alone = stage.denoise(req).latents[0]
        err = ((batch[i] - alone).norm() / alone.norm()).item()
        assert err < 1e-5, (i, err)
    stage.denoise(_denoise_request(stage, [], [1]))  # no LoRA: unmerges
    after = stage.runner.model.state_dict()
    assert all(torch.equal(weights_before[k], after[k]) for k in weights_before)
    assert stage.adapters.loads == 3 and stage.adapters.hits > 0


def test_adapter_store_is_lru_bounded(flux_dev_dir, lora_dir):
    stage = DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu", dtype="float32", max_loras=1))
    for name in ("style.safetensors", "kohya.safetensors", "style.safetensors"):
        stage.adapters.get(AdapterRef(name, str(lora_dir / name), 1.0))
    assert stage.adapters.loads == 3 and len(stage.adapters._loaded) == 1


@pytest.fixture()
def resolver(flux_dev_dir, lora_dir):
    model, spec = resolve(flux_dev_dir)
    return lora_resolver(model, spec, lora_dir)


def _ref(**kw):
    from services.runtime.config import LoraRef

    return LoraRef(**kw)


def test_paths_resolve_inside_the_lora_dir_only(resolver, lora_dir):
    ok = resolver.resolve([_ref(name="xl", path="sub/xlabs.safetensors", strength=0.3)])
    assert ok == [AdapterRef("xl", str((lora_dir / "sub" / "xlabs.safetensors").resolve()), 0.3)]
    outside = write_lora(lora_dir.parent / "outside.safetensors", {"a.lora_A.weight": torch.zeros(1, 1)})
    os.symlink(outside, lora_dir / "link.safetensors")
    checked = []
    resolver.check = lambda path, name: checked.append(name)
    for path in ["../outside.safetensors", str(outside), "link.safetensors", "sub/../../outside.safetensors"]:
        with pytest.raises(InvalidRequestError, match="'evil': .* is outside the LoRA directory"):
            resolver.resolve([_ref(name="evil", path=path)])
    with pytest.raises(InvalidRequestError, match="'gone': no such file"):
        resolver.resolve([_ref(name="gone", path="missing.safetensors")])
    with pytest.raises(InvalidRequestError, match="unknown LoRA 'nobody'"):
        resolver.resolve([_ref(name="nobody")])
    assert checked == []  # nothing refused was ever read


def test_bad_adapter_files_are_refused_with_their_name(resolver, lora_dir, flux_dev_dir):
    config = ModelDir(flux_dev_dir).component_config("transformer")
    (lora_dir / "junk.safetensors").write_bytes(b"not a safetensors file")
    state = flux_lora_state(config, "diffusers", rank=4, seed=9)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = state[key][:, :2]  # up rank 2 against down rank 4
    write_lora(lora_dir / "ranks.safetensors", state)
    big = {k: v.repeat(1, 2) if k.endswith("lora_A.weight") else v
           for k, v in flux_lora_state(config, "diffusers", rank=4, seed=9).items()}
    write_lora(lora_dir / "shape.safetensors", big)
    write_lora(lora_dir / "foreign.safetensors", {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 8),
                                                  "lora_unet_down_blocks_0.lora_up.weight": torch.zeros(8, 2)})
    for file, name in [("junk", "j"), ("ranks", "r"), ("shape", "s"), ("foreign", "f")]:
        with pytest.raises(InvalidRequestError, match=f"LoRA '{name}'"):
            resolver.resolve([_ref(name=name, path=f"{file}.safetensors")])


def test_server_refuses_request_paths_without_a_lora_dir(flux_dev_dir, lora_dir):
    model, spec = resolve(flux_dev_dir)
    with pytest.raises(InvalidRequestError, match="only from its --lora-dir"):
        lora_resolver(model, spec, None).resolve([_ref(name="a", path=str(lora_dir / "style.safetensors"))])


def test_generate_cli_lora_flags(flux_dev_dir, lora_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    base = ["generate", "--model-path", str(flux_dev_dir), "--prompt", "a cat", "--device", "cpu", "--seed", "1",
            "--height", "32", "--width", "32", "--num-inference-steps", "2", "--no-progress", "-o", str(out)]
    assert main([*base, "--lora-path", str(lora_dir / "kohya.safetensors"), "--lora-scale", "0.8"]) == 0
    assert main([*base, "--lora-path", str(lora_dir / "missing.safetensors")]) == 2
    assert "LoRA 'missing': no such file" in capsys.readouterr().err
    assert main([*base, "--lora-scale", "0.5"]) == 2


@pytest.mark.parametrize("parallel", [dict(tp_size=2), dict(ulysses_degree=2, cfg_parallel=True)],
                         ids=["tp2", "cfg2xulysses2"])
def test_lora_and_cache_on_a_parallel_replica(flux_dev_dir, lora_dir, parallel):
    """Tensor parallelism shards the adapters like the weights (merged and per sample); under
    sequence parallelism every rank takes the same caching decision (or the replica would hang)."""
    single = DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))
    group = DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu", dtype="float32", **parallel))
    style = AdapterRef("style", str(lora_dir / "style.safetensors"), 0.7)
    kohya = AdapterRef("k", str(lora_dir / "kohya.safetensors"), 0.5)
    try:
        for sets in ([[style], [style]], [[style], [kohya, style]]):  # merged, then mixed
            req = _denoise_request(single, sets, [1, 2])
            expected, got = single.denoise(req).latents, group.denoise(req).latents
            assert ((got - expected).norm() / expected.norm()).item() < 1e-5
        req = _denoise_request(single, [], [1], steps=12)
        req.cache = {"preset": "fast"}
        stats = group.denoise(req).cache_stats
        assert stats.cached_steps >= 1 and stats.computed_steps + stats.cached_steps == 12
    finally:
        group.close()


def test_compiled_blocks_share_graphs_with_and_without_lora(flux_dev_dir, lora_dir):
    """One graph per block type and LoRA state, whatever the number of block instances: the
    per-batch adapter tensors are graph inputs, not constants of each instance."""
    from torch._dynamo.utils import counters

    from services.denoiser.compile import compile_blocks

    torch._dynamo.reset()
    stage = DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))
    compile_blocks(stage.runner.model, backend="eager")
    style = AdapterRef("style", str(lora_dir / "style.safetensors"), 0.7)
    xl = AdapterRef("xl", str(lora_dir / "sub" / "xlabs.safetensors"), 1.0)
    counters.clear()
    for sets in ([], [[style], [xl]], [[xl], [style]], []):
        stage.denoise(_denoise_request(stage, sets, [1, 2]))
    # double and single block x (no LoRA, unmerged LoRA); the tiny model has 2 + 2 instances
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    torch._dynamo.reset()
