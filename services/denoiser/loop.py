"""The sampling loop: per step, predict (with true CFG when asked), then one Euler step."""

from __future__ import annotations

from typing import Callable

import torch

from services.denoiser.runner import DenoiserRunner, StepInputs
from services.denoiser.schedule import SigmaSchedule
from services.runtime.errors import RequestCancelledError


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
    cfg_renorm: bool = False,
) -> torch.Tensor:
    """Run every step of `schedule` from packed noise `latents`; returns packed latents.

    `cfg_renorm` (Qwen-Image's pipeline): the guided velocity is rescaled to the conditional
    one's norm per token. `on_step` may raise RequestCancelledError to stop; on a multi-rank replica every rank stops
    at the same step (rank 0 decides), so no rank is left waiting in a collective."""
    steps = len(schedule.timesteps)
    for i, t in enumerate(schedule.timesteps):
        # The pipeline's timestep arithmetic, kept as is: cast to the latent dtype, then / 1000.
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        velocities = runner.predict(latents, timestep, inputs)
        velocity = velocities[0]
        if len(velocities) == 2:
            cond, uncond = velocities
            velocity = uncond + true_cfg_scale * (cond - uncond)
            if cfg_renorm:
                velocity = velocity * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(velocity, dim=-1, keepdim=True))
        latents = euler_step(latents, velocity, schedule.sigmas[i], schedule.sigmas[i + 1])
        stop = False
        if on_step is not None:
            try:
                on_step(i + 1, steps)
            except RequestCancelledError:
                stop = True
        if runner.agree_to_stop(stop):
            raise RequestCancelledError(f"request cancelled after step {i + 1} of {steps}")
    return latents
