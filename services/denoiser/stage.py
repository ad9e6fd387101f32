"""The denoiser stage: `denoise(DenoiseRequest) -> DenoiseResponse`, one object per worker.

With a parallel config (ulysses / ring degrees, cfg parallelism) `DenoiserStage(config)` returns a
DenoiserGroup (services/denoiser/group.py): the same interface, backed by several ranks."""

from __future__ import annotations

from typing import Callable

from services.denoiser.latents import PackedLatents2x2, initial_noise
from services.denoiser.loop import sample
from services.denoiser.parallel.mesh import ParallelMesh
from services.denoiser.parallel.tp import TensorParallel
from services.denoiser.runner import DenoiserRunner
from services.denoiser.schedule import FlowMatchSchedule
from services.denoiser.weights import load_native_transformer
from services.runtime.config import DenoiserConfig, StageConfig
from services.runtime.device import default_dtype, measure, parse_device, parse_dtype
from services.runtime.messages import DenoiseRequest, DenoiseResponse
from services.runtime.registry import resolve


class DenoiserStage:
    def __new__(cls, config: StageConfig, mesh: ParallelMesh | None = None):
        if mesh is None and isinstance(config, DenoiserConfig) and config.world_size > 1:
            from services.denoiser.group import DenoiserGroup

            return DenoiserGroup(config)
        return super().__new__(cls)

    def __init__(self, config: StageConfig, mesh: ParallelMesh | None = None):
        self.model, self.spec = resolve(config.model_path)
        self.device = parse_device(config.device)
        self.dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(self.device)
        tp = TensorParallel(mesh.group("tp")) if mesh is not None and mesh.degrees.tp > 1 else None
        transformer = load_native_transformer(
            self.model, self.spec.denoiser, dtype=self.dtype, device=self.device, tp=tp
        )
        self.schedule = FlowMatchSchedule(self.model.component_config("scheduler"))
        # Packed tokens carry 2x2 patches of every latent channel: in_channels = 4 x channels.
        self.layout = PackedLatents2x2(transformer.config.in_channels // 4, self.model.vae_scale_factor)
        self.runner = DenoiserRunner(transformer, self.layout, self.device, self.dtype, mesh)

    def denoise(
        self, request: DenoiseRequest, on_step: Callable[[int, int], None] | None = None
    ) -> DenoiseResponse:
        with measure(self.device) as metrics:
            h, w = self.layout.latent_hw(request.height, request.width)
            noise = initial_noise(request.seeds, (self.layout.channels, h, w), self.dtype, self.device)
            latents = self.layout.pack(noise)
            schedule = self.schedule.for_request(request.num_inference_steps, latents.shape[1], self.device)
            inputs = self.runner.prepare(
                request.positive, request.negative, request.guidance_scale, len(request.seeds), h, w
            )
            latents = sample(self.runner, latents, inputs, schedule, request.true_cfg_scale, on_step)
            out = self.layout.unpack(latents, h, w)
        return DenoiseResponse(latents=out, metrics=metrics)
