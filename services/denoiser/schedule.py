"""The sigma schedule of one request (CPU bookkeeping only).

diffusers' FlowMatchEulerDiscreteScheduler computes the sigmas, from the checkpoint's own
scheduler_config.json, so every shifting option a checkpoint sets (dynamic/static shift,
shift_terminal, karras/exponential/beta sigmas) means what it means in diffusers. The loop then
steps with these sigmas itself, which keeps requests independent of a stateful scheduler object."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from services.runtime.errors import UnsupportedModelError


@dataclass(frozen=True)
class SigmaSchedule:
    timesteps: torch.Tensor  # [steps] float32, sigma * num_train_timesteps
    sigmas: torch.Tensor  # [steps + 1] float32, ending at the terminal sigma


def resolution_shift(image_seq_len: int, config: dict) -> float:
    """Flux's mu: linear in the number of image tokens between (base, max) sequence lengths."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


class FlowMatchSchedule:
    def __init__(self, scheduler_config: dict, sigma_linspace: str = "numpy"):
        """`sigma_linspace`: how the pipeline computes its default grid (PipelineSpec.sigma_linspace)."""
        if scheduler_config.get("_class_name") not in (None, "FlowMatchEulerDiscreteScheduler"):
            raise UnsupportedModelError(f"scheduler {scheduler_config['_class_name']} is not supported")
        if scheduler_config.get("stochastic_sampling"):
            raise UnsupportedModelError("FlowMatchEulerDiscreteScheduler with stochastic_sampling is not supported")
        self.config = scheduler_config
        self.sigma_linspace = sigma_linspace

    def for_request(self, num_steps: int, image_seq_len: int, device: torch.device) -> SigmaSchedule:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        # FluxPipeline's sigma grid; checkpoints that set use_flow_sigmas build their own.
        sigmas = None if self.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        if self.sigma_linspace == "torch":  # ZImagePipeline's, passed whatever the config says
            sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()
        scheduler.set_timesteps(
            num_steps if sigmas is None else None,
            device=device,
            sigmas=sigmas,
            mu=resolution_shift(image_seq_len, self.config),
        )
        return SigmaSchedule(timesteps=scheduler.timesteps, sigmas=scheduler.sigmas.to(device))
