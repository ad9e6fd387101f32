"""The sampling loop: per step, predict (with classifier-free guidance when asked), then one Euler step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from services.denoiser.runner import DenoiserRunner, StepInputs
from services.denoiser.schedule import SigmaSchedule
from services.runtime.errors import RequestCancelledError


@dataclass(frozen=True)
class Guidance:
    """How a step's velocity comes from the two branches' (the pipeline's CFG; the stage builds
    it from the request and the spec). Applies only where the request has a negative branch."""

    scale: float
    # guided = cond + s (cond - uncond) (ZImagePipeline); else uncond + s (cond - uncond).
    from_cond: bool = False
    # Rescale the guided velocity to the conditional one's norm, per token (QwenImagePipeline).
    renorm: bool = False
    # > 0: cap the guided velocity's norm, per image, at this times the conditional one's
    # (ZImagePipeline's cfg_normalization; the DiT's pad rows are zero, so they count nothing).
    max_norm_ratio: float = 0.0
    # No CFG on steps whose (1000 - t) / 1000 exceeds this (ZImagePipeline's cfg_truncation).
    truncation: float = 1.0

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        if self.from_cond:
            guided = cond + self.scale * (cond - uncond)
        else:
            guided = uncond + self.scale * (cond - uncond)
        if self.renorm:
            guided = guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
        if self.max_norm_ratio > 0:
            cap = torch.linalg.vector_norm(cond, dim=(1, 2), keepdim=True) * self.max_norm_ratio
            norm = torch.linalg.vector_norm(guided, dim=(1, 2), keepdim=True)
            guided = torch.where(norm > cap, guided * (cap / norm), guided)
        return guided


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """x_{t-1} = x_t + (sigma_next - sigma) * v, accumulated in fp32 and cast back to v's dtype
    (FlowMatchEulerDiscreteScheduler.step, op for op, so bf16 results round the same way)."""
    return (latents.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)


def sample(
    runner: DenoiserRunner,
    latents: torch.Tensor,
    inputs: StepInputs,
    schedule: SigmaSchedule,
    guidance: Guidance | float,
    on_step: Callable[[int, int], None] | None = None,
    timestep: str = "fraction",
    experts: list[int] | None = None,
    guidance_2: Guidance | None = None,
) -> torch.Tensor:
    """Run every step of `schedule` from packed noise `latents`; returns packed latents.

    `guidance`: a float is true CFG at that scale. `timestep` (spec.timestep): what the DiT is
    conditioned on. With "reversed" it also predicts the negated velocity; negating before CFG
    (the pipeline negates after it) changes nothing: IEEE rounding is symmetric, so each
    Guidance formula, norms included, gives exactly the negation of its value on the raw outputs.
    `experts`: the runner's expert for each step (Wan 2.2 A14B), else the one model throughout;
    `guidance_2` (if given) combines the branches on the second expert's steps.

    `on_step` may raise RequestCancelledError to stop; on a multi-rank replica every rank stops
    at the same step (rank 0 decides), so no rank is left waiting in a collective."""
    if not isinstance(guidance, Guidance):
        guidance = Guidance(guidance)
    steps = len(schedule.timesteps)
    # ZImagePipeline's cfg_truncation test, on the fp32 timesteps, computed once (no sync a step).
    guided = [t_norm <= guidance.truncation for t_norm in ((1000 - schedule.timesteps.float()) / 1000).tolist()]
    conditionings = []
    for t in schedule.timesteps:
        # The pipelines' timestep arithmetic, kept as is.
        t = t.expand(latents.shape[0])
        if timestep == "raw":  # WanPipeline hands the scheduler's t over as it is
            conditionings.append(t)
        else:  # Flux / Qwen-Image / Z-Image: cast to the latents' dtype first, then scaled
            t = t.to(latents.dtype)
            conditionings.append(t / 1000 if timestep == "fraction" else (1000 - t) / 1000)
    if steps:  # (the runner decides whether this model and replica tabulate: not with two experts)
        runner.precompute(inputs, torch.stack(conditionings))
    for i, conditioning in enumerate(conditionings):
        if experts is not None:
            runner.use_expert(experts[i])
        velocities = runner.predict(latents, conditioning, inputs, guided[i], step=i)
        if timestep == "reversed":
            velocities = [-v for v in velocities]
        rule = guidance_2 if guidance_2 is not None and experts is not None and experts[i] == 1 else guidance
        velocity = rule.combine(*velocities) if len(velocities) == 2 else velocities[0]
        if schedule.scheduler is None:
            latents = euler_step(latents, velocity, schedule.sigmas[i], schedule.sigmas[i + 1])
        else:  # a multistep solver (UniPC) keeps its own history: the request's own instance
            latents = schedule.scheduler.step(velocity, schedule.timesteps[i], latents, return_dict=False)[0]
        stop = False
        if on_step is not None:
            try:
                on_step(i + 1, steps)
            except RequestCancelledError:
                stop = True
        if runner.agree_to_stop(stop):
            raise RequestCancelledError(f"request cancelled after step {i + 1} of {steps}")
    return latents
