"""The diffusers backend: any diffusers pipeline, run whole inside one denoiser worker.

For pipelines with no native family (SD3, PixArt, Sana, ...), or any pipeline with
`--backend diffusers`. The worker answers the same Denoise call as a native denoiser, but the
request carries prompts instead of embeddings and the response carries pixels instead of
latents: the pipeline encodes, denoises and decodes itself, so the router skips the encoder and
VAE workers (the spec's `stages`). What stays the same: the API, seeds (image i draws from
torch.Generator("cpu").manual_seed(seeds[i]), as the native path does), per-step progress,
cancellation at the next step, timings and peak memory.

What it cannot do, refused at start or per request with a clear error rather than ignored:
sequence / tensor / CFG parallelism, fp8, layerwise offload, per-request LoRA and DiT caching
(all of which live in the native models)."""

from __future__ import annotations

import inspect
import logging

import diffusers
import numpy as np
import torch
import transformers

from services.denoiser.compile import should_compile, use_compile_cache
from services.runtime.config import DenoiserConfig, warmup_size
from services.runtime.device import default_dtype, measure, parse_device, parse_dtype
from services.runtime.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from services.runtime.messages import DenoiseRequest, DenoiseResponse
from services.runtime.pipelines.diffusers_any import DENOISER_COMPONENTS, pipeline_class
from services.runtime.registry import resolve

log = logging.getLogger(__name__)

# Options of DenoiserOptions that only native models implement, with the value meaning "off".
_NATIVE_ONLY = {"ulysses_degree": 1, "ring_degree": 1, "tp_size": 1, "cfg_parallel": False, "precision": "default",
                "attention_precision": "default", "layerwise_offload": False}


class DiffusersPipelineStage:
    def __init__(self, config: DenoiserConfig):
        self.config = config
        self.model, self.spec = resolve(config.model_path, config.backend)
        used = [k for k, off in _NATIVE_ONLY.items() if getattr(config, k) != off]
        if used:
            raise UnsupportedModelError(
                f"{', '.join(used)}: not available with the diffusers backend ({self.spec.family} runs whole in one "
                "worker, without sequence parallelism, fp8 or offload)")
        self.device = parse_device(config.device)
        self.dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(self.device)
        cls = pipeline_class(self.model.pipeline_class)
        diffusers.utils.logging.disable_progress_bar()  # a worker's log is not a terminal
        transformers.utils.logging.disable_progress_bar()
        try:
            self.pipe = cls.from_pretrained(self.model.path, torch_dtype=self.dtype).to(self.device)
        except Exception as exc:  # a checkpoint diffusers cannot load: one line, not a traceback
            reason = " ".join(str(exc).split())
            raise ModelLoadError(f"diffusers could not load {self.model.path} as {cls.__name__}: {reason}") from None
        self.pipe.set_progress_bar_config(disable=True)
        self.params = inspect.signature(self.pipe.__call__).parameters
        denoiser = next((getattr(self.pipe, c) for c in DENOISER_COMPONENTS if getattr(self.pipe, c, None) is not None),
                        None)
        # Regional compile where the model names its repeated blocks (diffusers' DiTs do; UNets
        # do not, and run eager): the same static-shape, per-block compile as the native path.
        if should_compile(config.compile, self.device) and getattr(denoiser, "_repeated_blocks", None):
            use_compile_cache(config.compile_cache_dir)
            denoiser.compile_repeated_blocks(fullgraph=True)
        self.warm_up(config.warmup_resolutions)

    def warm_up(self, sizes: list[str]) -> None:
        """One single-step run of the whole pipeline per "WIDTHxHEIGHT" size (a video model at
        its default clip length), so compiling and the first-call set-up happen before traffic."""
        defaults = self.spec.defaults(self.model)
        multiple = self.spec.size_multiple(self.model)
        for size in sizes:
            height, width = warmup_size(size, multiple)
            self.denoise(DenoiseRequest(
                positive=None, negative=None, height=height, width=width, num_inference_steps=1,
                guidance_scale=defaults.guidance_scale, true_cfg_scale=1.0, seeds=[0], prompts=[""],
                num_frames=defaults.num_frames, fps=defaults.fps, input_images=self._warm_up_images(height, width),
                mask=torch.full((height, width), 255, dtype=torch.uint8) if "mask_required" in self.spec.features
                else None))

    def _warm_up_images(self, height: int, width: int) -> list[torch.Tensor]:
        # a pipeline that cannot run without an input image gets a grey one of the output size
        needs = "image_required" in self.spec.features
        return [torch.full((height, width, 3), 128, dtype=torch.uint8)] if needs else []

    def denoise(self, request: DenoiseRequest, on_step=None) -> DenoiseResponse:
        kwargs = self._call_arguments(request)
        if on_step is not None:
            kwargs.update(self._step_callback(on_step, request.num_inference_steps))
        with measure(self.device) as metrics, torch.inference_mode():
            out = self.pipe(**kwargs)
            # float in [0, 1]: images [B, H, W, 3]; a video pipeline's frames [B, F, H, W, 3]
            images = out.frames if request.num_frames else out.images
        # diffusers' numpy_to_pil rounding, so the bytes equal the pipeline's own PIL output
        pixels = torch.from_numpy((np.asarray(images) * 255).round().astype("uint8"))
        return DenoiseResponse(latents=None, images=pixels, metrics=metrics)

    def _step_callback(self, on_step, total: int) -> dict:
        """Per-step progress (and cancellation: on_step raises once the caller gave up) through
        whichever hook the pipeline has: callback_on_step_end, or the older callback."""
        if "callback_on_step_end" in self.params:
            def on_step_end(pipe, step, timestep, tensors):
                on_step(step + 1, total)
                return tensors

            return {"callback_on_step_end": on_step_end}
        if "callback" in self.params and "callback_steps" in self.params:
            return {"callback": lambda step, timestep, latents: on_step(step + 1, total), "callback_steps": 1}
        log.warning("%s has no step callback: no progress events, and cancellation waits for the end",
                    self.spec.family)
        return {}

    def _call_arguments(self, request: DenoiseRequest) -> dict:
        if request.positive is not None or not request.prompts:
            raise InvalidRequestError(f"{self.spec.family} runs the whole pipeline here: send prompts, not embeddings")
        if len(request.prompts) != len(request.seeds):
            raise InvalidRequestError(f"{len(request.prompts)} prompts for {len(request.seeds)} images")
        if any(request.loras):
            raise InvalidRequestError(f"per-request LoRA is not available for {self.spec.family}", "lora")
        if request.cache is not None:
            raise InvalidRequestError(f"DiT caching is not available for {self.spec.family}", "cache")
        kwargs = {
            "prompt": request.prompts, "height": request.height, "width": request.width,
            "num_inference_steps": request.num_inference_steps, "guidance_scale": request.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(s) for s in request.seeds], "output_type": "np",
        }
        if request.negative_prompts:
            kwargs["negative_prompt"] = request.negative_prompts
            if "true_cfg_scale" in self.params:  # Flux-style true CFG through diffusers
                kwargs["true_cfg_scale"] = request.true_cfg_scale
        if request.num_frames:
            kwargs["num_frames"] = request.num_frames
            kwargs["frame_rate"] = request.fps  # LTX conditions on it; dropped below where not taken
        if request.input_images:
            from PIL import Image

            images = [Image.fromarray(t.numpy()) for t in request.input_images]
            kwargs["image"] = images[0] if len(images) == 1 else images  # several: e.g. Qwen-Image-Edit-Plus
        if request.mask is not None:
            from PIL import Image

            kwargs["mask_image"] = Image.fromarray(request.mask.numpy())
        if request.max_sequence_length and "max_sequence_length" in self.params:
            kwargs["max_sequence_length"] = request.max_sequence_length
        return {k: v for k, v in kwargs.items() if k in self.params or k == "prompt"}
