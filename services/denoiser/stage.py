"""The denoiser stage: `denoise(DenoiseRequest) -> DenoiseResponse`, one object per worker.

With a parallel config (ulysses / ring degrees, cfg parallelism) `DenoiserStage(config)` returns a
DenoiserGroup (services/denoiser/group.py): the same interface, backed by several ranks."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import torch

from services.denoiser.attention_fp8 import unavailable_reason
from services.denoiser.compile import compile_blocks, should_compile, use_compile_cache
from services.denoiser.graphs import should_graph
from services.denoiser.latents import initial_noise
from services.denoiser.loop import Guidance, sample
from services.denoiser.lora.apply import LoraRunner
from services.denoiser.lora.formats import module_shapes
from services.denoiser.lora.store import AdapterStore
from services.denoiser.models import FAMILIES
from services.denoiser.parallel import copy_exchange
from services.denoiser.parallel.comm import gather_ints
from services.denoiser.parallel.mesh import ParallelMesh
from services.denoiser.parallel.tp import TensorParallel
from services.denoiser.quant import apply_precision
from services.denoiser.runner import DenoiserRunner, with_first_tokens
from services.denoiser.schedule import FlowMatchSchedule
from services.denoiser.weights import load_native_transformer
from services.runtime.cache_policy import CachePolicy
from services.runtime.config import DenoiserConfig, StageConfig, warmup_size
from services.runtime.device import default_dtype, measure, parse_device, parse_dtype
from services.runtime.errors import InvalidRequestError
from services.runtime.messages import Conditioning, DenoiseRequest, DenoiseResponse
from services.runtime.registry import resolve

log = logging.getLogger(__name__)


class DenoiserStage:
    def __new__(cls, config: StageConfig, mesh: ParallelMesh | None = None):
        if resolve(config.model_path, config.backend)[1].whole_pipeline:
            from services.denoiser.diffusers_backend import DiffusersPipelineStage

            return DiffusersPipelineStage(DenoiserConfig(**config.model_dump()) if not isinstance(
                config, DenoiserConfig) else config)
        if mesh is None and isinstance(config, DenoiserConfig) and config.world_size > 1:
            from services.denoiser.group import DenoiserGroup

            return DenoiserGroup(config)
        return super().__new__(cls)

    def __init__(self, config: StageConfig, mesh: ParallelMesh | None = None):
        if not isinstance(config, DenoiserConfig):
            config = DenoiserConfig(**config.model_dump())
        self.config = config
        self.model, self.spec = resolve(config.model_path, config.backend)
        self.device = parse_device(config.device)
        self.dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(self.device)
        transformer = self._load_transformer("transformer", mesh)
        if config.attention_precision == "fp8":
            dims = transformer.config  # Z-Image's names: dim / n_heads
            head_dim = getattr(dims, "attention_head_dim", None) or dims.dim // dims.n_heads
            if reason := unavailable_reason(self.device, head_dim):
                raise InvalidRequestError(reason, "attention_precision")
        # Wan 2.2 A14B: a second expert takes the steps after the boundary timestep; both stay
        # in this replica (offloaded layer by layer with --dit-layerwise-offload).
        boundary = self.model.index.get("boundary_ratio")
        self.expert_2 = self._load_transformer("transformer_2", mesh) if boundary is not None else None
        self.boundary_timestep = boundary * self.model.component_config("scheduler").get(
            "num_train_timesteps", 1000) if boundary is not None else None
        self.schedule = FlowMatchSchedule(self.model.component_config("scheduler"), self.spec.sigma_linspace,
                                          self.spec.mu)
        self.layout = FAMILIES[self.spec.denoiser].layout.for_model(transformer.config, self.model.vae_scale_factor)
        self.latent_dtype = torch.float32 if self.spec.fp32_latents else self.dtype
        # Wan 2.2 TI2V: a timestep per token, and image-to-video through the first latent frame.
        self.expand_timesteps = bool(self.model.index.get("expand_timesteps"))
        graphs = should_graph(config, self.device, config.world_size > 1, self.spec.variable_text)
        copy_exchange.use_copy_engine(config.ulysses_exchange == "copy-engine")
        if config.ulysses_exchange == "copy-engine" and not graphed_ulysses(config, graphs):
            log.warning("--ulysses-exchange copy-engine changes nothing here: it applies to the forwards a "
                        "Ulysses replica (no ring) replays from CUDA graphs")
        self.runner = DenoiserRunner(transformer, self.layout, self.device, self.dtype, mesh, expert_2=self.expert_2,
                                     velocity_in_dit_dtype=self.spec.guidance_in_dit_dtype,
                                     cuda_graphs=graphs,
                                     attention_precision=config.attention_precision,
                                     modulation_tables=not config.layerwise_offload,  # offloaded: on the host
                                     variable_text=self.spec.variable_text)
        self.lora = LoraRunner(transformer, self.device)
        self.adapters = AdapterStore(module_shapes(type(transformer), transformer.config), config.max_loras)
        if mesh is None:  # a multi-rank group warms up through its own denoise (every rank)
            warm_up(self, config)

    def on_rank_death(self) -> None:
        """Called from rank 0's death watch (runtime/rank_group.py) while it aborts the
        communicators, as this rank may be stuck in a graph on the dead rank's collective."""
        self.runner.abandon_graphs()

    def before_leaving_group(self) -> None:
        """Called on every rank of a multi-rank replica before it leaves the process group
        (runtime/rank_group.py): the runner's CUDA graphs hold its NCCL communicators."""
        self.runner.close()

    def _load_transformer(self, component: str, mesh: ParallelMesh | None):
        config = self.config
        tp = TensorParallel(mesh.group("tp")) if mesh is not None and mesh.degrees.tp > 1 else None
        # With offload the weights are read into host memory; only what stays resident moves.
        load_device = torch.device("cpu") if config.layerwise_offload else self.device
        transformer = load_native_transformer(
            self.model, self.spec.denoiser, dtype=self.dtype, device=load_device, tp=tp, component=component
        )
        apply_precision(transformer, config.precision)
        if config.layerwise_offload:
            from services.denoiser.offload import enable_layerwise_offload

            # kept with the stage: the offload's hooks and pinned host copies live as long as it
            self.offloads = getattr(self, "offloads", []) + [
                enable_layerwise_offload(transformer, self.device, config.offload_prefetch)]
        if should_compile(config.compile, self.device):
            use_compile_cache(config.compile_cache_dir)
            compile_blocks(transformer, overlap_comm=mesh is not None, variable_text=self.spec.variable_text)
        return transformer

    def denoise(
        self, request: DenoiseRequest, on_step: Callable[[int, int], None] | None = None
    ) -> DenoiseResponse:
        loads, hits = self.adapters.loads, self.adapters.hits
        with measure(self.device) as metrics:
            # a video's latent frames: the VAE folds frame_multiple frames into one, after the first
            frames = (request.num_frames - 1) // self.spec.frame_multiple + 1 if request.num_frames else 0
            grid = self.layout.latent_grid(request.height, request.width, frames)
            noise = initial_noise(request.seeds, (self.layout.channels, *grid), self.latent_dtype, self.device)
            latents = self.layout.pack(noise)
            schedule = self.schedule.for_request(request.num_inference_steps, self.layout.seq_len(grid), self.device)
            cache = CachePolicy(**request.cache).resolved(request.num_inference_steps) if request.cache else None
            mode, timestep_mask, first = self._image_conditioning(request, grid, latents)
            inputs = self.runner.prepare(
                request.positive, request.negative, request.guidance_scale, len(request.seeds), grid, cache,
                references=request.reference_latents, reference_mode=mode, image_embeds=request.image_embeds,
                timestep_mask=timestep_mask,
            )
            self._use_loras(request)
            self.runner.graphs_allowed = not self.lora.unmerged  # per-batch LoRA tensors: not in a graph
            try:
                # WanPipeline's switch: the first expert while t >= boundary, the second after
                experts = None if self.boundary_timestep is None else [
                    0 if t >= self.boundary_timestep else 1 for t in schedule.timesteps.tolist()]
                latents = sample(self.runner, latents, inputs, schedule, self._guidance(request), on_step,
                                 timestep=self.spec.timestep, experts=experts,
                                 guidance_2=self._guidance(request, expert=1) if experts else None)
            finally:
                self.lora.deactivate()
                self.runner.use_expert(0)  # the next request starts on the first expert
            if first is not None:  # the pipeline's last (1 - mask) * condition + mask * latents
                latents = with_first_tokens(latents, first)
            out = self.layout.unpack(latents, grid)
        metrics.lora_loads, metrics.lora_hits = self.adapters.loads - loads, self.adapters.hits - hits
        if self.runner.mesh is not None:  # every rank runs this call: one small all-gather
            metrics.peak_memory_by_rank = gather_ints(metrics.peak_memory_bytes, self.device)
        return DenoiseResponse(latents=out, metrics=metrics, cache_stats=inputs.cache_stats())

    def _image_conditioning(self, request: DenoiseRequest, grid: tuple[int, ...], latents: torch.Tensor):
        """How the request's input-image latents enter the DiT (spec.ImageConditioning), checked:
        (the runner's reference_mode, a per-token timestep mask or None, the packed first latent
        frame that replaces the state's first tokens or None)."""
        rule, refs = self.spec.image_conditioning, request.reference_latents
        if bool(refs) != (rule is not None):
            raise InvalidRequestError(f"image: {self.spec.family} " + (
                "needs the latents of its input image(s)" if rule else "takes no input images"), "image")
        first_grid = (1, *grid[1:]) if self.expand_timesteps else grid  # TI2V: the first latent frame only
        if rule is not None and rule.mode == "first_frame" and (
                len(refs) != 1 or tuple(refs[0].shape[1:]) != first_grid):
            raise InvalidRequestError(f"image: the first-frame latents {[tuple(r.shape) for r in refs]} do not "
                                      f"match the output's latent grid {first_grid}", "image")
        mode = rule.mode if rule else "tokens"
        if not self.expand_timesteps:
            return mode, None, None
        # WanPipeline's mask of ones (a per-token copy of t); with an input image its first latent
        # frame is the image's latents, at timestep 0 (WanImageToVideoPipeline).
        timestep_mask = torch.ones(latents.shape[1], dtype=torch.float32)
        if mode != "first_frame":
            return mode, timestep_mask, None
        first = self.layout.pack(refs[0][None]).to(self.device, latents.dtype)
        timestep_mask[: first.shape[1]] = 0
        return "first_latent", timestep_mask, first

    def _guidance(self, request: DenoiseRequest, expert: int = 0) -> Guidance:
        """How the branches combine; `expert` 1: on a two-expert model's low-noise steps, whose
        scale is guidance_scale_2 (WanPipeline's; None there means guidance_scale)."""
        rule = self.spec.cfg
        scale = request.guidance_scale if rule.scale == "guidance_scale" else request.true_cfg_scale
        if expert == 1 and request.guidance_scale_2 is not None:
            scale = request.guidance_scale_2
        return Guidance(scale, from_cond=rule.from_cond, renorm=rule.renorm,
                        max_norm_ratio=request.cfg_normalization, truncation=request.cfg_truncation)

    def _use_loras(self, request: DenoiseRequest) -> None:
        if request.loras and len(request.loras) != len(request.seeds):
            raise InvalidRequestError(f"{len(request.loras)} LoRA lists for {len(request.seeds)} images", "lora")
        per_sample = [[(self.adapters.get(ref), ref.strength) for ref in refs] for refs in request.loras]
        self.lora.use(per_sample, self.dtype)


def warm_up(stage, config: DenoiserConfig) -> None:
    """One single-step request per --warmup-resolutions size (batch 1, the model's default text
    length), so compiling and autotuning happen before the replica takes traffic."""
    if not config.warmup_resolutions:
        return
    model, spec = resolve(config.model_path, config.backend)
    fam = FAMILIES[spec.denoiser]
    transformer = fam.config_cls.from_dict(model.component_config("transformer"))
    multiple = spec.size_multiple(model)
    text_len = spec.defaults(model).max_sequence_length
    plain_too = plain_forwards_compile_apart(config, spec.variable_text)
    for size in config.warmup_resolutions:
        height, width = warmup_size(size, multiple)
        cond = Conditioning(
            prompt_embeds=torch.zeros(1, text_len, transformer.joint_attention_dim),
            pooled_prompt_embeds=torch.zeros(1, transformer.pooled_projection_dim),
        )
        # A model conditioned on an input image gets zeros of its latent's shape (an edit model:
        # one image of the output's size; image-to-video: the clip), and CLIP tokens if it takes them.
        layout = fam.layout.for_model(transformer, model.vae_scale_factor)
        references = [torch.zeros(layout.channels, *layout.latent_grid(height, width, 1))] \
            if spec.image_conditioning is not None else []
        image_dim = getattr(transformer, "image_dim", None)
        request = DenoiseRequest(positive=cond, negative=None, height=height, width=width, num_inference_steps=1,
                                 guidance_scale=3.5, true_cfg_scale=1.0, seeds=[0],
                                 num_frames=1 if "video" in spec.features else 0, reference_latents=references,
                                 image_embeds=torch.zeros(1, 257, image_dim) if image_dim else None)
        stage.denoise(request)
        if plain_too:
            stage.denoise(replace(request, cache={"enabled": True}))  # a DiT cache: no graphs


def plain_forwards_compile_apart(config: DenoiserConfig, variable_text: bool) -> bool:
    """Whether forwards that run without CUDA graphs (a DiT cache, unmerged LoRA) use compiled
    blocks of their own: on a graphed Ulysses replica whose blocks trace the exchanges, where
    graphed forwards take the exchanges as one op (SequenceParallel.for_graphs). The warm-up then
    runs one such forward per size too, or the first cached or LoRA request would compile.
    (The device is read, not checked: a group's driver process may have no GPU of its own.)"""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return not variable_text and graphed_ulysses(config, should_graph(config, device, config.world_size > 1,
                                                                      variable_text))


def graphed_ulysses(config: DenoiserConfig, graphs: bool) -> bool:
    """Whether a replica with (`graphs`) or without CUDA graphs replays Ulysses forwards from them,
    the forwards whose exchanges run as ops (SequenceParallel.for_graphs: not with ring)."""
    return graphs and config.ulysses_degree > 1 and config.ring_degree == 1
