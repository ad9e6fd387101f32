"""The embedded default model draws what it is asked for, and the serving options keep it so:
prompt adherence read back by the shipped shape classifier (training/classifier.py), through
ditserve's real in-process router on the shipped files. Nothing here retrains."""

import numpy as np
import pytest

from services.cli import build_in_process_router
from services.runtime.config import StageConfig
from services.runtime.registry import DEFAULT_MODEL_PATH
from training.classifier import load_classifier
from training.quality import adherence, generate_eval_set

LORA = str(DEFAULT_MODEL_PATH.parent / "loras" / "outlined.safetensors")
SEEDS = 4  # 24 prompts x 4 = 96 pictures: one picture is ~1 point of adherence


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def router():
    return build_in_process_router(StageConfig(device="cpu"))  # model_path None: the embedded model


@pytest.fixture(scope="module")
def default_set(router):
    return generate_eval_set(router, SEEDS)


def test_default_model_follows_its_prompts(classifier, default_set):
    got = adherence(classifier, default_set)
    assert got["adherence"] >= 0.90, got
    assert got["outlined"] <= 0.02, got  # the classifier sees no style where there is none


def test_fast_cache_preset_keeps_adherence(classifier, router, default_set):
    cached = generate_eval_set(router, SEEDS, cache={"preset": "fast"})
    assert not np.array_equal(cached.pixels, default_set.pixels)  # the cache did skip work
    base, fast = adherence(classifier, default_set)["adherence"], adherence(classifier, cached)["adherence"]
    assert fast >= base - 0.05, (base, fast)


def test_example_lora_at_zero_changes_nothing_and_at_one_is_seen(classifier, router, default_set):
    def lora(strength, seeds=SEEDS, prompts=None):
        return generate_eval_set(router, seeds, prompts=prompts,
                                 lora=[{"name": "outlined", "path": LORA, "strength": strength}])

    # (the first 6 prompts: the same seeds as default_set's first 6 x SEEDS pictures)
    assert np.array_equal(lora(0.0, prompts=6).pixels, default_set.pixels[: 6 * SEEDS])
    assert adherence(classifier, lora(1.0, seeds=2))["outlined"] >= 0.90


# CFG-parallel splits the two branches of true CFG, so its requests carry a negative prompt.
TRUE_CFG = dict(negative_prompt="a white square on a black background", true_cfg_scale=1.5)


@pytest.mark.parametrize(("layout", "request_fields"),
                         [(dict(ulysses_degree=2), {}), (dict(tp_size=2), {}), (dict(cfg_parallel=True), TRUE_CFG)],
                         ids=["ulysses2", "tp2", "cfg2"])
def test_parallel_layouts_give_the_default_pixels(router, layout, request_fields):
    # 8 of the prompts: a pixel comparison, not an adherence score (test_parallel_e2e.py has the rest)
    reference = generate_eval_set(router, 1, base_seed=1000, prompts=8, **request_fields)
    parallel = build_in_process_router(StageConfig(device="cpu"), denoiser_options=layout)
    try:
        got = generate_eval_set(parallel, 1, base_seed=1000, prompts=8, **request_fields)
    finally:
        parallel.denoiser.stage.close()
    diff = np.abs(got.pixels.astype(int) - reference.pixels.astype(int))
    # fp32 sums in another order across ranks may flip an 8-bit rounding, never more (as
    # tests/cpu/test_parallel_e2e.py).
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
