"""The sampling loop: per step, predict (with true CFG when asked), then one Euler step."""

from __future__ import annotations

from typing import Callable

import torch

from services.denoiser.runner import DenoiserRunner, StepInputs
from services.denoiser.schedule import SigmaSchedule


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """x_{t-1} = x_t + (sigma_next - sigma) * v, accumulated in fp32 and cast back to v's dtype
    (FlowMatchEulerDiscreteScheduler.step, op for op, so bf16 results round the same way)."""
    return (latents.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)


def sample(
    runner: DenoiserRunner,
    latents: torch.Tensor,
    inputs: StepInputs,
    schedule: SigmaSchedule,
    true_cfg_scale: float,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run every step of `schedule` from packed noise `latents`; returns packed latents."""
    steps = len(schedule.timesteps)
    for i, t in enumerate(schedule.timesteps):
        # The pipeline's timestep arithmetic, kept as is: cast to the latent dtype, then / 1000.
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        velocity = runner.predict(latents, timestep, inputs.positive, inputs.guidance)
        if inputs.negative is not None:
            uncond = runner.predict(latents, timestep, inputs.negative, inputs.guidance)
            velocity = uncond + true_cfg_scale * (velocity - uncond)
        latents = euler_step(latents, velocity, schedule.sigmas[i], schedule.sigmas[i + 1])
        if on_step is not None:
            on_step(i + 1, steps)
    return latents
