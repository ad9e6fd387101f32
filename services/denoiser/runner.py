"""The only code that runs the DiT on the device.

`prepare` moves a request's conditioning to the device once and builds what stays fixed across
steps (RoPE tables, guidance vector); `predict` returns the velocity of each conditioning branch.
With a parallel mesh, each forward runs sequence-parallel (image tokens sharded over the ring x
ulysses ranks) and, with cfg parallelism, the two branches run on the two halves of the mesh."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from services.denoiser.attention import attention_precision
from services.denoiser.cache import BlockCache
from services.denoiser.compile import MAX_SHAPES
from services.denoiser.graphs import CaptureError, ForwardGraphs
from services.denoiser.latents import PackedLatents2x2
from services.denoiser.parallel import copy_exchange
from services.denoiser.parallel.comm import all_to_all, broadcast_flag, mean_over
from services.denoiser.parallel.context import SequenceParallel
from services.denoiser.parallel.mesh import ParallelMesh
from services.runtime.cache_policy import ResolvedCache
from services.runtime.messages import CacheStats, Conditioning

log = logging.getLogger(__name__)

# At most this many bytes of precomputed modulations per request (DenoiserRunner.precompute):
# Flux.1-dev's are 2.1 MB per step, sample and branch in bf16, so 28 steps of a batch of 4 with
# true CFG fit; Qwen-Image's are 4.4 MB per step, one table for all samples and both branches.
# A larger request computes them step by step as before.
MODULATION_BUDGET = 512 << 20
# After a rank died: how long the graph replay under way gets to end once its barriers were
# released (abandon_graphs) before the graphs are destroyed regardless.
REPLAY_END_S = 5.0


@dataclass
class BranchInputs:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    rope: tuple[torch.Tensor, ...]  # the model's tables: (cos, sin), Z-Image's (cos, sin, pad)
    cache: BlockCache | None = None  # this branch's DiT cache state, when the request asked
    # The token split of this branch: its own, since a negative prompt's text length may differ
    # from the positive's (Qwen-Image's prompts are not padded to a fixed length).
    sp: SequenceParallel | None = None
    # [T, B, W]: the DiT's modulations for each step and sample, when precomputed (precompute).
    modulations: torch.Tensor | None = None


@dataclass
class StepInputs:
    positive: BranchInputs
    negative: BranchInputs | None
    guidance: torch.Tensor | None
    # Packed tokens [1, R, D] of the batch's input images (image editing), appended to every
    # image's noise tokens in each forward; the DiT's output keeps only the noise tokens.
    reference: torch.Tensor | None = None
    # [N + R] bool, True on those appended tokens: for DiTs that modulate them apart
    # (Qwen-Image-Edit-2511's zero_cond_t); None for the others.
    reference_tokens: torch.Tensor | None = None
    # Tokens [1, N, P*C'] of image-to-video's first-frame condition, joined to the noise tokens'
    # channels in each forward (the layout's join_channels).
    channels: torch.Tensor | None = None
    # The encoder's image tokens [1, T, D] (Wan 2.1 I2V's CLIP), cross-attended by both branches.
    image_embeds: torch.Tensor | None = None
    # A timestep per token (Wan 2.2 TI2V's expand_timesteps): this [N] fp32 mask times t (0 on
    # tokens that hold a given first frame, 1 elsewhere); None: one timestep per image.
    timestep_mask: torch.Tensor | None = None
    # Tokens [1, n, D] of a given first latent frame that replace the first n tokens of every
    # forward's input (Wan 2.2 TI2V image-to-video), in the DiT's dtype.
    first_tokens: torch.Tensor | None = None

    def cache_stats(self) -> CacheStats | None:
        """The request's steps as the positive branch ran them (computed / from the cache)."""
        cache = self.positive.cache
        if cache is None or not cache.enabled:
            return None
        return CacheStats(computed_steps=cache.computed_steps, cached_steps=cache.cached_steps)


def with_first_tokens(latents: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """latents [B, N, D] with their first n tokens replaced by `first` [1, n, D]: Wan 2.2 TI2V's
    (1 - mask) * condition + mask * latents, for a mask that is 0 on those tokens exactly."""
    return torch.cat([first.expand(latents.shape[0], -1, -1), latents[:, first.shape[1]:]], dim=1)


class DenoiserRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        layout: PackedLatents2x2,
        device: torch.device,
        dtype: torch.dtype,
        mesh: ParallelMesh | None = None,
        expert_2: torch.nn.Module | None = None,
        velocity_in_dit_dtype: bool = False,
        cuda_graphs: bool = False,
        attention_precision: str = "default",
        modulation_tables: bool = True,
        variable_text: bool = False,
    ):
        self.model, self.layout, self.device, self.dtype, self.mesh = model, layout, device, dtype, mesh
        self.attention_precision = attention_precision  # "fp8": attention_fp8.py
        # Whole forwards as CUDA graphs (graphs.py), except where a forward is not the same
        # device work every time: a DiT cache decides per step on the host, and unmerged LoRA
        # tensors change per batch (the stage clears `graphs_allowed` while those are set).
        self.graphs = ForwardGraphs(device) if cuda_graphs and device.type == "cuda" else None
        self.graphs_allowed = True
        # Modulations precomputed per request (precompute), except where the modulation weights
        # are not on the device (layerwise offload: the stage passes False) or carry a per-batch
        # LoRA update (the model says so: modulations_tabulable).
        self.modulation_tables = modulation_tables
        self._sp_cache: dict[tuple[int, int], SequenceParallel] = {}
        # spec.variable_text: each prompt reaches the DiT at its own length, so sequence-parallel
        # exchanges stay outside compiled graphs (SequenceParallel's outside_graphs)
        self.variable_text = variable_text
        # Wan 2.2 A14B's experts (same architecture, so the same RoPE tables and shards serve
        # both); `use_expert` picks the one the next steps run.
        self.experts = [model] if expert_2 is None else [model, expert_2]
        # spec.guidance_in_dit_dtype: predictions stay in the DiT's dtype (WanPipeline), else they
        # come back in the latents' (ZImagePipeline's fp32 CFG; a no-op where the two agree).
        self.velocity_in_dit_dtype = velocity_in_dit_dtype

    def close(self) -> None:
        """Release what ties this runner to its process group (the CUDA graphs): every rank
        calls it before it leaves the group (runtime/rank_group.py)."""
        if self.graphs is not None:
            self.graphs.clear()
        copy_exchange.release_all()  # no graph holds their buffers now

    def abandon_graphs(self) -> None:
        """A rank died mid-forward (runtime/rank_group.py's death watch, another thread). First
        the barriers of the copy-engine exchanges let go of the dead rank, as NCCL's abort
        (run beside this) makes its kernels do. Then the replay under way is given time to end:
        a graph destroyed mid-launch releases its hold on the NCCL communicators, which their
        abort waits for, only once that launch ends. Destroying the graphs waits for the device."""
        copy_exchange.abort_all()
        graphs = self.graphs  # (the request thread may drop it meanwhile, after a failed capture)
        if graphs is not None:
            graphs.stop()  # no replay after the one under way
            try:
                if not graphs.replay_ended(REPLAY_END_S):
                    log.warning("a CUDA graph replay still runs %.0f s after a rank died (a kernel waits on "
                                "the dead rank); destroying the graphs anyway", REPLAY_END_S)
            finally:  # (a CUDA error in the wait must not keep the graphs, which the abort waits for)
                graphs.abandon()
        # Not after a failed abandon: a graph left may still read the aborted exchanges' buffers.
        copy_exchange.forget_aborted()

    def use_expert(self, index: int) -> None:
        self.model = self.experts[index]

    def prepare(
        self, positive: Conditioning, negative: Conditioning | None, guidance_scale: float, batch: int,
        grid: tuple[int, ...], cache: ResolvedCache | None = None, references: list[torch.Tensor] = (),
        reference_mode: str = "tokens", image_embeds: torch.Tensor | None = None,
        timestep_mask: torch.Tensor | None = None,
    ) -> StepInputs:
        """`references`: normalised latents of the input images, per `reference_mode`: [C, h, w]
        per image ("tokens", image editing), the first-frame clip's [C, f, h, w] ("first_frame",
        image-to-video), or the first latent frame [C, 1, h, w] ("first_latent", TI2V's
        image-to-video). `image_embeds`: [1, T, D]. `timestep_mask`: see StepInputs."""
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32).expand(batch)
        reference = channels = first_tokens = None
        grids: tuple[tuple[int, ...], ...] = ()
        if references and reference_mode == "first_frame":
            channels = self.layout.first_frame_condition(references[0]).to(self.device, self.dtype)
        elif references and reference_mode == "first_latent":
            first_tokens = self.layout.pack(references[0][None].to(self.device, self.dtype))
        elif references:
            reference = torch.cat([self.layout.pack(r[None].to(self.device, self.dtype)) for r in references], dim=1)
            grids = tuple(tuple(r.shape[1:]) for r in references)
        reference_tokens = None
        if reference is not None and getattr(self.model.config, "zero_cond_t", False):
            noise = self.layout.seq_len(grid)
            reference_tokens = torch.arange(noise + reference.shape[1], device=self.device) >= noise
        return StepInputs(
            positive=self._branch(positive, grid, cache, grids),
            negative=self._branch(negative, grid, cache, grids) if negative is not None else None,
            guidance=guidance,
            reference=reference,
            reference_tokens=reference_tokens,
            channels=channels,
            image_embeds=image_embeds.to(self.device, self.dtype) if image_embeds is not None else None,
            timestep_mask=timestep_mask.to(self.device) if timestep_mask is not None else None,
            first_tokens=first_tokens,
        )

    def _agree(self, metric: torch.Tensor) -> torch.Tensor:
        """Every rank of a branch takes the same caching decision: the mean of their metrics."""
        dims = [d for d in ("ring", "ulysses", "tp") if getattr(self.mesh.degrees, d) > 1]
        return mean_over(metric, [self.mesh.group(d) for d in dims])

    def _sequence_parallel(self, text_tokens: int, image_tokens: int) -> SequenceParallel:
        # One object per token layout: torch.compile guards on the active one's identity, so a
        # new object per request would recompile every compiled block.
        key = (text_tokens, image_tokens)
        if key not in self._sp_cache:
            # as many layouts as compiled blocks keep shapes (prompt lengths vary): drop the oldest
            if len(self._sp_cache) >= MAX_SHAPES:
                self._sp_cache.pop(next(iter(self._sp_cache)))
            self._sp_cache[key] = SequenceParallel(self.mesh, text_tokens, image_tokens,
                                                   outside_graphs=self.variable_text)
        return self._sp_cache[key]

    def _branch(self, cond: Conditioning, grid: tuple[int, ...], cache: ResolvedCache | None,
                references: tuple[tuple[int, ...], ...] = ()) -> BranchInputs:
        text_len = cond.prompt_embeds.shape[1]
        embeds = self.layout.pad_text(cond.prompt_embeds.to(self.device, self.dtype))
        # (only layouts of families with image conditioning take reference grids)
        extra = {"references": references} if references else {}
        rope = self.layout.rope(self.model, text_len, grid, self.device, **extra)
        agree = self._agree if self.mesh is not None and self.mesh.degrees.world_size > 1 else None
        sp = None
        if self.mesh is not None and self.mesh.sp_size > 1:  # rope has a row per sequence token
            text = embeds.shape[1] if self.layout.text_in_sequence else 0  # else: every rank gets it whole
            sp = self._sequence_parallel(text, rope[0].shape[0] - text)
        return BranchInputs(
            prompt_embeds=embeds,
            pooled_prompt_embeds=cond.pooled_prompt_embeds.to(self.device, self.dtype),
            rope=rope,
            cache=BlockCache(cache, agree) if cache is not None and cache.enabled else None,
            sp=sp,
        )

    @torch.inference_mode()
    def precompute(self, inputs: StepInputs, timesteps: torch.Tensor) -> None:
        """Before a request's first step: every step's modulations of a model that can tabulate
        them (FluxTransformer.modulation_table, QwenImageTransformer's), into each branch's
        `modulations`. `timesteps` [T, B] are the DiT's timestep inputs of the T steps. One sample
        at a time, so a sample's rows do not depend on the batch it is in (a GEMM's rounding can
        depend on its row count). Skipped past MODULATION_BUDGET bytes: the per-step GEMVs then stay."""
        model = self.model
        if (not self.modulation_tables or not hasattr(model, "modulation_table") or len(self.experts) > 1
                or not model.modulations_tabulable()):
            return
        steps, batch = timesteps.shape
        branches = [b for b in (inputs.positive, inputs.negative) if b is not None]
        # A model whose modulations do not depend on the prompt (Qwen-Image's: the timestep's
        # alone) makes one table for both branches, and one for all samples that step through
        # the same timesteps (the batch's rows are then views of it).
        per_prompt = getattr(model, "modulations_per_prompt", True)
        shared = not per_prompt and bool((timesteps == timesteps[:, :1]).all())
        tables = (len(branches) if per_prompt else 1) * (1 if shared else batch)
        size = steps * tables * model.modulation_width * torch.finfo(self.dtype).bits // 8
        if size > MODULATION_BUDGET:
            return
        guidance, table = inputs.guidance, None
        for branch in branches:
            if table is None or per_prompt:
                pooled = branch.pooled_prompt_embeds
                table = torch.stack([model.modulation_table(
                    timesteps[:, b], guidance[b : b + 1].expand(steps) if guidance is not None else None,
                    pooled[b : b + 1].expand(steps, -1), self.dtype) for b in range(1 if shared else batch)], dim=1)
                table = table.expand(steps, batch, -1)
            branch.modulations = table

    @torch.inference_mode()
    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: StepInputs,
                guided: bool = True, step: int | None = None) -> list[torch.Tensor]:
        """Velocity of each branch: [positive] or [positive, negative] (guided: False runs the
        positive one only, a step the pipeline runs without CFG), in the latents' dtype (or the
        DiT's, see velocity_in_dit_dtype). `step`: the index into precomputed modulations."""
        branches = [inputs.positive] + ([inputs.negative] if inputs.negative is not None and guided else [])
        # Latents may be fp32 around a bf16 DiT (spec.fp32_latents): the pipeline's casts, in and
        # out (out after the exchanges, which then move the DiT's dtype).
        x = latents.to(self.dtype)
        if self.mesh is not None and self.mesh.degrees.cfg == 2 and len(branches) == 2:
            mine = self._forward(x, timestep, branches[self.mesh.rank("cfg")], inputs, step)
            shapes = [tuple(mine.shape)] * 2
            velocities = all_to_all([mine, mine], shapes, self.mesh.group("cfg"))
        else:
            velocities = [self._forward(x, timestep, b, inputs, step) for b in branches]
        return velocities if self.velocity_in_dit_dtype else [v.to(latents.dtype) for v in velocities]

    def _forward(self, latents, timestep, branch: BranchInputs, inputs: StepInputs, step: int | None) -> torch.Tensor:
        mods = branch.modulations[step] if branch.modulations is not None and step is not None else None
        if self.graphs is None or not self.graphs_allowed or branch.cache is not None:
            return self._run(latents, timestep, branch, inputs, mods)
        optional = ("guidance", "reference", "reference_tokens", "channels", "image_embeds", "timestep_mask",
                    "first_tokens")
        tensors = [latents, timestep, branch.prompt_embeds, branch.pooled_prompt_embeds, mods,
                   *(getattr(inputs, name) for name in optional), *branch.rope]

        def forward(latents, timestep, embeds, pooled, mods, *rest):
            fields = dict(zip(optional, rest))
            rope = tuple(rest[len(optional):])
            return self._run(latents, timestep, replace(branch, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                                                       rope=rope), replace(inputs, **fields), mods, graphed=True)

        # The same shapes give the same token split, so the model is all the key needs besides them.
        try:
            return self.graphs.run(forward, tensors, depends_on=id(self.model))
        except CaptureError as exc:
            # Graphs are on by default for some replicas (graphs.should_graph), and a family's forward
            # may hold something a graph cannot (every rank of a group fails alike: same code and
            # shapes). The replica keeps serving at the plain forward's speed, and says so.
            log.warning("CUDA graph capture of the %s forward failed (%s); this replica runs without "
                        "CUDA graphs from now on (--no-cuda-graphs silences this)", type(self.model).__name__, exc)
            self.graphs.clear()
            self.graphs = None
            return self._run(latents, timestep, branch, inputs, mods)

    def _run(self, latents, timestep, branch: BranchInputs, inputs: StepInputs, mods: torch.Tensor | None,
             graphed: bool = False):
        with attention_precision(self.attention_precision):
            return self._run_model(latents, timestep, branch, inputs, mods, graphed)

    def _run_model(self, latents, timestep, branch: BranchInputs, inputs: StepInputs,
                   mods: torch.Tensor | None, graphed: bool = False) -> torch.Tensor:
        noise_tokens, batch = latents.shape[1], latents.shape[0]
        if inputs.reference is not None:  # the edit pipelines' cat([latents, image_latents], dim=1)
            latents = torch.cat([latents, inputs.reference.expand(batch, -1, -1)], dim=1)
        if inputs.channels is not None:  # WanImageToVideoPipeline's cat([latents, condition], dim=1)
            latents = self.layout.join_channels(latents, inputs.channels.expand(batch, -1, -1))
        if inputs.first_tokens is not None:  # TI2V: the given first latent frame, every forward
            latents = with_first_tokens(latents, inputs.first_tokens)
        if inputs.timestep_mask is not None:  # TI2V: (mask * t), a timestep per token
            timestep = inputs.timestep_mask[None, :] * timestep[:, None]
        extra = {}
        if inputs.image_embeds is not None:  # whole on every rank, like the text
            extra["encoder_hidden_states_image"] = inputs.image_embeds.expand(batch, -1, -1)
        if inputs.reference_tokens is not None:  # sharded below as the tokens are
            extra["reference_tokens"] = inputs.reference_tokens
        if mods is not None:  # per sample, whole on every rank
            extra["modulations"] = mods
        # a forward replayed from a CUDA graph takes the exchanges that cost host time (for_graphs)
        sp = branch.sp.for_graphs() if branch.sp is not None and graphed else branch.sp
        if sp is None:
            out = self.model(
                latents, branch.prompt_embeds, branch.pooled_prompt_embeds, timestep, branch.rope, inputs.guidance,
                cache=branch.cache, **extra,
            )
            return out[:, :noise_tokens] if inputs.reference is not None else out
        text, image = sp.shard(branch.prompt_embeds, latents)
        if not self.layout.text_in_sequence:
            text = branch.prompt_embeds
        if timestep.ndim == 2:  # per-token timesteps: the same shard as the tokens
            timestep = sp.shard(branch.prompt_embeds, timestep)[1]
        if "reference_tokens" in extra:
            extra["reference_tokens"] = sp.shard(branch.prompt_embeds, extra["reference_tokens"][None])[1][0]
        with sp.active():
            local = self.model(
                image, text, branch.pooled_prompt_embeds, timestep, sp.shard_rope(branch.rope), inputs.guidance,
                cache=branch.cache, **extra,
            )
        out = sp.gather_image(local)
        return out[:, :noise_tokens] if inputs.reference is not None else out

    def agree_to_stop(self, stop: bool) -> bool:
        """Rank 0's decision (e.g. its client went away), the same on every rank of the replica."""
        if self.mesh is None:
            return stop
        return broadcast_flag(stop, self.device)
