"""The sampling pieces against diffusers: sigma schedule, noise, latent packing."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from services.denoiser.latents import PackedLatents2x2, initial_noise
from services.denoiser.loop import euler_step
from services.denoiser.schedule import FlowMatchSchedule


@pytest.mark.parametrize("steps,seq_len", [(1, 16), (4, 256), (28, 4096), (50, 16384)])
def test_schedule_matches_flux_pipeline(flux_dev_dir, steps, seq_len):
    config = dict(FlowMatchEulerDiscreteScheduler.from_pretrained(flux_dev_dir / "scheduler").config)
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    got = FlowMatchSchedule(config).for_request(steps, seq_len, torch.device("cpu"))
    torch.testing.assert_close(got.sigmas, ref.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(got.timesteps, ref.timesteps, rtol=0, atol=0)


def test_euler_step_matches_scheduler_step_bf16():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    x = torch.randn(1, 8, 4).bfloat16()
    v = torch.randn(1, 8, 4).bfloat16()
    sched.set_begin_index(2)
    expected = sched.step(v, sched.timesteps[2], x, return_dict=False)[0]
    got = euler_step(x, v, sched.sigmas[2], sched.sigmas[3])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_is_diffusers_randn_tensor_with_per_image_generators(dtype):
    seeds = [0, 1, 2**33]
    shape = (4, 6, 10)
    expected = randn_tensor(
        (3, *shape), generator=[torch.Generator().manual_seed(s) for s in seeds], device=torch.device("cpu"), dtype=dtype
    )
    torch.testing.assert_close(initial_noise(seeds, shape, dtype, torch.device("cpu")), expected, rtol=0, atol=0)


def test_packing_matches_flux_pipeline():
    layout = PackedLatents2x2(channels=4, vae_scale_factor=8)
    h, w = layout.latent_hw(96, 160)
    assert (h, w) == (12, 20)
    latents = torch.randn(2, 4, h, w)
    packed = layout.pack(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 4, h, w), rtol=0, atol=0)
    torch.testing.assert_close(layout.unpack(packed, (h, w)), latents, rtol=0, atol=0)
    ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
    torch.testing.assert_close(layout.image_ids(h, w, torch.device("cpu")), ids, rtol=0, atol=0)
