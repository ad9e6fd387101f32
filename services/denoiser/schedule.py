"""The sigma schedule of one request (CPU bookkeeping only).

diffusers' FlowMatchEulerDiscreteScheduler computes the sigmas, from the checkpoint's own
scheduler_config.json, so every shifting option a checkpoint sets (dynamic/static shift,
shift_terminal, karras/exponential/beta sigmas) means what it means in diffusers. The loop then
steps with these sigmas itself, which keeps requests independent of a stateful scheduler object.

A multistep solver (UniPCMultistepScheduler, which Wan's checkpoints ship) carries history
between steps, so there the request gets its own scheduler instance and the loop calls its
step(); it is still one object per request, never shared."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from services.runtime.errors import UnsupportedModelError


@dataclass(frozen=True)
class SigmaSchedule:
    timesteps: torch.Tensor  # [steps] float32, sigma * num_train_timesteps
    sigmas: torch.Tensor  # [steps + 1] float32, ending at the terminal sigma
    # A multistep solver's per-request instance, which steps itself; None: Euler on the sigmas.
    scheduler: object | None = None


# Scheduler classes a native family may ship, besides FlowMatchEuler: the multistep solvers
# stepped through their own step() (flow-prediction configs).
MULTISTEP = {"UniPCMultistepScheduler": UniPCMultistepScheduler}


def resolution_shift(image_seq_len: int, config: dict) -> float:
    """Flux's mu: linear in the number of image tokens between (base, max) sequence lengths."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Flux.2's mu (diffusers' compute_empirical_mu, op for op): lines in image_seq_len fitted at
    10 and 200 steps, interpolated in the step count up to 4300 tokens; the scheduler config's
    shift bounds play no part."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


# PipelineSpec.mu: (image_seq_len, num_steps, scheduler config) -> mu.
MU = {
    "calculate_shift": lambda seq_len, steps, config: resolution_shift(seq_len, config),
    "compute_empirical_mu": lambda seq_len, steps, config: empirical_mu(seq_len, steps),
}


class FlowMatchSchedule:
    def __init__(self, scheduler_config: dict, sigma_linspace: str = "numpy", mu: str = "calculate_shift"):
        """`sigma_linspace`: how the pipeline computes its default grid (PipelineSpec.sigma_linspace);
        `mu`: its resolution shift (PipelineSpec.mu)."""
        name = scheduler_config.get("_class_name")
        if name not in (None, "FlowMatchEulerDiscreteScheduler", *MULTISTEP):
            raise UnsupportedModelError(f"scheduler {name} is not supported")
        if name in MULTISTEP and sigma_linspace != "scheduler":
            raise UnsupportedModelError(f"scheduler {name} is supported only where the pipeline uses its own grid")
        if sigma_linspace == "scheduler" and scheduler_config.get("use_dynamic_shifting"):
            # set_timesteps(n) alone would raise on every request: the pipeline passes no mu
            raise UnsupportedModelError(f"scheduler {name or 'FlowMatchEulerDiscreteScheduler'} with "
                                        "use_dynamic_shifting needs a resolution shift this pipeline does not give")
        if scheduler_config.get("stochastic_sampling"):
            raise UnsupportedModelError("FlowMatchEulerDiscreteScheduler with stochastic_sampling is not supported")
        self.config = scheduler_config
        self.sigma_linspace = sigma_linspace
        self.mu = MU[mu]

    def for_request(self, num_steps: int, image_seq_len: int, device: torch.device) -> SigmaSchedule:
        if self.sigma_linspace == "scheduler":  # WanPipeline: set_timesteps(n), nothing else
            cls = MULTISTEP.get(self.config.get("_class_name"), FlowMatchEulerDiscreteScheduler)
            scheduler = cls.from_config(self.config)
            scheduler.set_timesteps(num_steps, device=device)
            scheduler.set_begin_index(0)
            return SigmaSchedule(timesteps=scheduler.timesteps, sigmas=scheduler.sigmas.to(device),
                                 scheduler=scheduler if cls is not FlowMatchEulerDiscreteScheduler else None)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        # FluxPipeline's sigma grid; checkpoints that set use_flow_sigmas build their own.
        sigmas = None if self.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        if self.sigma_linspace == "torch":  # ZImagePipeline's, passed whatever the config says
            sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()
        scheduler.set_timesteps(
            num_steps if sigmas is None else None,
            device=device,
            sigmas=sigmas,
            mu=self.mu(image_seq_len, num_steps, self.config),
        )
        return SigmaSchedule(timesteps=scheduler.timesteps, sigmas=scheduler.sigmas.to(device))
