"""The router: resolves requests, batches compatible ones, and drives encode -> denoise -> decode.

It is the only place that knows the order of stages, and it reaches them only through stage
clients (in-process, gRPC or Ray: the same async methods)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from services.router.batcher import Batcher
from services.router.loras import LoraResolver
from services.router.requests import GeneratedImage, GenerateResult, ResolvedRequest, resolve_request
from services.runtime import metrics
from services.runtime.config import GenerateRequest, RouterConfig
from services.runtime.errors import DeadlineExceededError, InvalidRequestError
from services.runtime.messages import (
    Conditioning,
    DecodeRequest,
    DenoiseRequest,
    EncodeRequest,
    VaeEncodeRequest,
    VaeEncodeResponse,
)
from services.runtime.registry import ModelDir
from services.runtime.spec import PipelineSpec
from services.runtime.stage_client import DenoiserClient, EncoderClient, StepCallback, VaeClient


@dataclass
class _Job:
    request: ResolvedRequest
    on_step: StepCallback | None
    deadline: float  # time.monotonic()


class Router:
    def __init__(
        self,
        model: ModelDir,
        spec: PipelineSpec,
        encoder: EncoderClient | None,
        denoiser: DenoiserClient,
        vae: VaeClient | None,
        config: RouterConfig | None = None,
        loras: LoraResolver | None = None,
    ):
        self.model, self.spec = model, spec
        self.loras = loras
        self.encoder, self.denoiser, self.vae = encoder, denoiser, vae
        self.config = config or RouterConfig()
        self.batcher = Batcher(
            self._run_batch,
            window_s=self.config.batch_window_ms / 1000,
            max_batch_images=self.config.max_batch_size,
            max_queue=self.config.max_queue,
        )

    def resolve(self, req: GenerateRequest) -> ResolvedRequest:
        return resolve_request(req, self.model, self.spec, self.config.cache)

    async def check(self, req: GenerateRequest) -> ResolvedRequest:
        """The request as it would run (defaults filled in), or its InvalidRequestError, without
        running it: what an API that queues work (POST /v1/videos) answers at once."""
        return self.resolve(req)

    async def generate(
        self, req: GenerateRequest, on_step: StepCallback | None = None, timeout_s: float | None = None
    ) -> GenerateResult:
        t0 = time.perf_counter()
        resolved = self.resolve(req)
        if self.loras is not None:  # file checks: off the event loop
            adapters = await asyncio.to_thread(self.loras.resolve, req.lora)
            resolved = dataclasses.replace(resolved, loras=tuple(adapters))
        elif req.lora:
            raise InvalidRequestError("this server does not serve LoRA adapters", "lora")
        timeout_s = timeout_s or self.config.request_timeout_s
        job = _Job(resolved, on_step, time.monotonic() + timeout_s)
        try:
            result = await asyncio.wait_for(
                self.batcher.submit(resolved.batch_key, job, len(resolved.seeds)), timeout_s
            )
        except asyncio.TimeoutError:
            raise DeadlineExceededError(f"request did not finish within {timeout_s:g}s") from None
        result.total_seconds = time.perf_counter() - t0
        return result

    async def lora_admin(self, op: str, **fields) -> dict:
        """The server-wide LoRA endpoints (SGLang-Diffusion's names and fields): `set` registers
        an adapter and makes it the default of requests that name none; `merge` / `unmerge`
        switch that default on / off; `list` reports. Every replica reads adapters itself."""
        if self.loras is None:
            raise InvalidRequestError("this server does not serve LoRA adapters", "lora")
        loras = self.loras
        if op == "set":
            target = fields.get("target") or "transformer"
            if target not in ("transformer", "all"):
                raise InvalidRequestError(f"LoRA target '{target}': only the transformer takes adapters", "target")
            name, path = fields.get("lora_nickname"), fields.get("lora_path")
            if not name:
                raise InvalidRequestError("lora_nickname is required", "lora_nickname")
            strength = float(fields.get("strength") if fields.get("strength") is not None else 1.0)
            ref = await asyncio.to_thread(loras.register, name, path, strength) if path else None
            if ref is None:
                if name not in loras.registered:
                    raise InvalidRequestError(f"unknown LoRA '{name}': give lora_path to register it", "lora_path")
                ref = dataclasses.replace(loras.registered[name], strength=strength)
            loras.default_set, loras.default_on = [ref], True
        elif op in ("merge", "unmerge"):
            loras.default_on = op == "merge"
        elif op != "list":
            raise InvalidRequestError(f"unknown LoRA operation '{op}'")
        return {
            "loras": [{"lora_nickname": n, "lora_path": r.path} for n, r in sorted(loras.registered.items())],
            "active": [{"lora_nickname": r.name, "strength": r.strength} for r in loras.default],
            "merged": bool(loras.default),
        }

    async def metrics_text(self) -> str:
        """This router's Prometheus exposition (the gateway serves it with its own)."""
        return metrics.router_exposition()

    async def ready(self) -> dict[str, bool]:
        clients = {role: getattr(self, role) for role in self.spec.stages}
        checks = await asyncio.gather(*(c.ready() for c in clients.values()))
        return dict(zip(clients, checks))

    async def _run_batch(self, jobs: list[_Job]) -> list[GenerateResult]:
        """One encoder call for every prompt of the batch, one denoiser call for every image,
        one VAE call; results are split back per request. Where the encoder's rows have
        different real lengths (Qwen-Image, Z-Image), jobs go to the denoiser in groups of equal lengths,
        so the DiT sees no padding and each image is the one its request gets alone."""
        t_batch = time.perf_counter()
        if self.spec.whole_pipeline:
            return await self._run_whole_pipeline(jobs, t_batch)
        first = jobs[0].request
        timeout = max(j.deadline for j in jobs) - time.monotonic()
        prompts = [j.request.prompt for j in jobs]
        if first.cfg:
            prompts += [j.request.negative_prompt for j in jobs]
        images = [torch.from_numpy(np.array(im)) for im in first.images]  # the batch shares them
        if self.spec.image_conditioning is not None:
            # An edit or image-to-video model: the encoder sees the input images (with each prompt,
            # or through its own image encoder) while the VAE encodes them to the latents the DiT
            # is conditioned on; the two run side by side.
            enc, refs = await asyncio.gather(
                self.encoder.encode(EncodeRequest(prompts, first.max_sequence_length, images=images), timeout_s=timeout),
                self.vae.encode_images(VaeEncodeRequest(images, first.height, first.width, first.num_frames),
                                       timeout_s=timeout))
        else:
            enc, refs = await self.encoder.encode(EncodeRequest(prompts, first.max_sequence_length),
                                                  timeout_s=timeout), None
        if enc.prompt_lengths is None:
            return await self._denoise_decode(jobs, enc, list(range(len(jobs))), t_batch, True, refs)
        n, lengths = len(jobs), enc.prompt_lengths.tolist()
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault((lengths[i], lengths[n + i] if first.cfg else None), []).append(i)
        # Concurrently: with several denoiser replicas the groups run side by side (a single worker
        # takes them one after another, as it would separate batches).
        members = list(groups.values())
        done = await asyncio.gather(*(self._denoise_decode([jobs[i] for i in m], enc, m, t_batch, g == 0, refs)
                                      for g, m in enumerate(members)))
        results = {i: r for m, rs in zip(members, done) for i, r in zip(m, rs)}
        return [results[i] for i in range(n)]

    async def _denoise_decode(self, jobs: list[_Job], enc, rows_of_jobs: list[int], t_batch: float,
                              first_group: bool, refs: VaeEncodeResponse | None = None):
        """Denoise and decode `jobs`, whose prompts are rows `rows_of_jobs` of `enc` (and their
        negative prompts the same rows + the batch's job count, after them); `refs`: the VAE's
        latents of the batch's input images (an edit model). The encoder and VAE-encode calls
        are recorded in the metrics with the batch's first group only: they ran once."""
        first = jobs[0].request
        cfg = first.cfg
        counts = [len(j.request.seeds) for j in jobs]
        job_rows = torch.tensor(rows_of_jobs)
        rows = torch.repeat_interleave(job_rows, torch.tensor(counts))
        negative_offset = enc.prompt_embeds.shape[0] // 2

        def conditioning(offset: int) -> Conditioning:
            embeds = enc.prompt_embeds[rows + offset]
            if enc.prompt_lengths is not None:  # equal real lengths in this group: drop the padding
                embeds = embeds[:, : int(enc.prompt_lengths[job_rows[0] + offset])]
            return Conditioning(prompt_embeds=embeds, pooled_prompt_embeds=enc.pooled_prompt_embeds[rows + offset])

        def on_step(done: int, total: int) -> None:
            for j in jobs:
                if j.on_step is not None:
                    j.on_step(done, total)

        den = await self.denoiser.denoise(
            DenoiseRequest(
                positive=conditioning(0),
                negative=conditioning(negative_offset) if cfg else None,
                height=first.height,
                width=first.width,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                true_cfg_scale=first.true_cfg_scale,
                seeds=[s for j in jobs for s in j.request.seeds],
                loras=[list(j.request.loras) for j in jobs for _ in j.request.seeds]
                if any(j.request.loras for j in jobs) else [],
                cache=first.cache.model_dump(exclude_none=True) if first.cache is not None else None,
                num_frames=first.num_frames,
                fps=first.fps,
                cfg_normalization=first.cfg_normalization,
                cfg_truncation=first.cfg_truncation,
                guidance_scale_2=first.guidance_scale_2,
                reference_latents=refs.latents if refs is not None else [],
                image_embeds=enc.image_embeds,
            ),
            on_step=on_step,
            timeout_s=max(j.deadline for j in jobs) - time.monotonic(),
        )
        dec = await self.vae.decode(
            DecodeRequest(latents=den.latents), timeout_s=max(j.deadline for j in jobs) - time.monotonic()
        )
        stages = {"encoder": enc.metrics, "denoiser": den.metrics, "vae": dec.metrics}
        if refs is not None:
            stages["vae_encode"] = refs.metrics
        observed = stages if first_group else {k: v for k, v in stages.items() if k not in ("encoder", "vae_encode")}
        metrics.observe_batch(observed, sum(counts), first.num_inference_steps, den.cache_stats,
                              time.perf_counter() - t_batch)
        return _split(jobs, dec.images, stages, den.cache_stats)

    async def _run_whole_pipeline(self, jobs: list[_Job], t_batch: float) -> list[GenerateResult]:
        """The diffusers backend: one denoiser call runs the whole pipeline for every image of
        the batch (one prompt per image) and returns pixels."""
        first = jobs[0].request

        def on_step(done: int, total: int) -> None:
            for j in jobs:
                if j.on_step is not None:
                    j.on_step(done, total)

        per_image = [(j.request, s) for j in jobs for s in j.request.seeds]
        den = await self.denoiser.denoise(
            DenoiseRequest(
                positive=None, negative=None, height=first.height, width=first.width,
                num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                true_cfg_scale=first.true_cfg_scale, seeds=[s for _, s in per_image],
                prompts=[r.prompt for r, _ in per_image],
                # the batch key keeps requests with and without a negative prompt apart
                negative_prompts=[r.negative_prompt for r, _ in per_image] if first.negative_prompt is not None else [],
                max_sequence_length=first.max_sequence_length,
                num_frames=first.num_frames,
                fps=first.fps,
                input_images=[torch.from_numpy(np.array(im)) for im in first.images],
                mask=torch.from_numpy(np.ascontiguousarray(first.mask)) if first.mask is not None else None,
            ),
            on_step=on_step,
            timeout_s=max(j.deadline for j in jobs) - time.monotonic(),
        )
        stages = {"denoiser": den.metrics}
        metrics.observe_batch(stages, len(per_image), first.num_inference_steps, None, time.perf_counter() - t_batch)
        return _split(jobs, den.images, stages, None)


def _split(jobs: list[_Job], images: torch.Tensor, stages: dict, cache_stats) -> list[GenerateResult]:
    """A batch's uint8 [B, H, W, 3] pixels back into one result per request, in order."""
    counts = [len(j.request.seeds) for j in jobs]
    results, start = [], 0
    for job, n in zip(jobs, counts):
        pixels = images[start : start + n].numpy()
        out = [GeneratedImage(pixels=pixels[i], seed=s) for i, s in enumerate(job.request.seeds)]
        results.append(GenerateResult(job.request, out, stages, batch_size=sum(counts), cache_stats=cache_stats))
        start += n
    return results
