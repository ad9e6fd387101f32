"""Typed, validated configuration: the public generation request and the stage config.

Validation that needs the model (size multiples, defaults) happens in the router once the
spec is known; what is checked here is what is wrong for every model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.runtime.cache_policy import CachePolicy
from services.runtime.errors import InvalidRequestError

MAX_IMAGES_PER_REQUEST = 16
MAX_FRAMES = 1025
MAX_INPUT_IMAGES = 4
MAX_SIDE_PX = 4096
Backend = Literal["auto", "native", "diffusers"]
_SIZE = re.compile(r"(\d+)x(\d+)")


MAX_LORAS_PER_REQUEST = 8


class LoraRef(BaseModel):
    """One LoRA adapter of a request: a registered `name`, or `path` to a safetensors file
    (relative to the server's --lora-dir; `name` then labels it in errors and stats)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    path: str | None = Field(None, min_length=1, max_length=4096)
    strength: float = Field(1.0, ge=-10.0, le=10.0)


class GenerateRequest(BaseModel):
    """One text-to-image request. `None` fields take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    height: int | None = Field(None, gt=0, le=MAX_SIDE_PX)
    width: int | None = Field(None, gt=0, le=MAX_SIDE_PX)
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0.0)
    # Real classifier-free guidance against negative_prompt; applies only when > 1 and a
    # negative prompt is given (diffusers' FluxPipeline rule).
    true_cfg_scale: float | None = Field(None, ge=0.0)  # None: the model's default (Flux 1.0, Qwen-Image 4.0)
    # ZImagePipeline's CFG limits (families with the "cfg_limits" feature): cap the guided
    # prediction's norm at this times the conditional one's (0: off), and run no CFG once the
    # denoising progress (1000 - t) / 1000 exceeds cfg_truncation.
    cfg_normalization: float | None = Field(None, ge=0.0)
    cfg_truncation: float | None = Field(None, ge=0.0, le=1.0)
    # Two-expert models (Wan 2.2 A14B): the CFG scale of the low-noise expert's steps; None:
    # guidance_scale, as WanPipeline defaults it.
    guidance_scale_2: float | None = Field(None, ge=0.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    max_sequence_length: int | None = Field(None, ge=1)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    # Stacked in order; empty: the server's default set (POST /v1/set_lora), usually none.
    lora: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS_PER_REQUEST)
    # DiT caching for this request (services/denoiser/cache.py); None: the server's default.
    cache: CachePolicy | None = None
    # Video models: frames per clip (None: the model's default) and the MP4's frame rate.
    num_frames: int | None = Field(None, ge=1, le=MAX_FRAMES)
    fps: int | None = Field(None, ge=1, le=120)
    # Video length as OpenAI's videos API gives it; num_frames, when given, wins.
    seconds: float | None = Field(None, gt=0, le=120)
    # Edit / image-to-image / image-to-video pipelines: the input images and mask, as file bytes
    # (PNG, JPEG, WebP, ...); decoded and checked by the router.
    images: list[bytes] = Field(default_factory=list, max_length=MAX_INPUT_IMAGES)
    mask: bytes | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return v

    @classmethod
    def parse(cls, **fields) -> "GenerateRequest":
        """Validate, turning pydantic's multi-line report into one InvalidRequestError."""
        return validated(cls, fields)


def _check_sizes(sizes: list[str]) -> list[str]:
    for size in sizes:
        if not _SIZE.fullmatch(size) or not all(0 < int(x) <= MAX_SIDE_PX for x in size.split("x")):
            raise ValueError(f"warmup resolution '{size}' is not WIDTHxHEIGHT (each 1..{MAX_SIDE_PX})")
    return sizes


WarmupSizes = Annotated[list[str], AfterValidator(_check_sizes)]


def parse_size(size: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (height, width)."""
    width, height = (int(x) for x in size.split("x"))
    return height, width


def warmup_size(size: str, multiple: int) -> tuple[int, int]:
    """(height, width) of a warm-up size, whose sides the stage needs in multiples of `multiple`."""
    height, width = parse_size(size)
    if height % multiple or width % multiple:
        raise InvalidRequestError(f"warmup resolution {size}: sides must be multiples of {multiple}",
                                  "warmup_resolutions")
    return height, width


class StageConfig(BaseModel):
    """Where and how a stage runs its components."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path | None = None  # None: the embedded default model
    device: str | None = None  # None: cuda if available, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: per device
    # native: a native family only; diffusers: the whole diffusers pipeline in the denoiser
    # worker; auto: native where a family matches the pipeline class, else diffusers.
    backend: Backend = "auto"


class DenoiserOptions(BaseModel):
    """How one denoiser replica runs: its parallel layout and its speed / memory options.
    Shared by the stage config (DenoiserConfig) and the serve config's denoiser pool.
    Ranks = (2 if cfg_parallel else 1) x ring_degree x ulysses_degree x tp_size."""

    model_config = ConfigDict(extra="forbid")

    ulysses_degree: int = Field(1, ge=1)
    ring_degree: int = Field(1, ge=1)
    tp_size: int = Field(1, ge=1)
    # Conditional and unconditional branches (true CFG) on different ranks.
    cfg_parallel: bool = False
    # fp8: the blocks' linears in e4m3 with row-wise scales (services/denoiser/quant.py).
    precision: Literal["default", "fp8"] = "default"
    # fp8: attention through cuDNN's fp8 flash kernel (services/denoiser/attention_fp8.py), per
    # sample per-tensor scales (Flux's q / k: static, from their norms); for long sequences
    # (video, 2048x2048). Ring attention stays as is.
    attention_precision: Literal["default", "fp8"] = "default"
    # torch.compile of the repeated blocks, static shapes; None = on when the device is CUDA.
    compile: bool | None = None
    # Where compiled kernels persist (inductor + Triton caches), so a restart skips the compile.
    # Mount a volume here in a container; None = torch's default under /tmp.
    compile_cache_dir: Path | None = None
    # "WIDTHxHEIGHT" sizes to compile and run once at start, before the replica takes requests.
    warmup_resolutions: WarmupSizes = Field(default_factory=list)
    # Where request LoRA paths resolve; nothing outside it is read. None: request paths refused
    # (registered names only) when serving; `generate` reads the files it is given.
    lora_dir: Path | None = None
    max_loras: int = Field(8, ge=1, description="adapters a replica keeps loaded (LRU)")
    # Each DiT forward captured once per shape and replayed as a CUDA graph (denoiser/graphs.py).
    # None = on for a compiled replica on CUDA that is multi-rank or fp8 (linears or attention):
    # where the host's kernel and NCCL launches were the bottleneck (4x H200, Ulysses-4,
    # 1024x1024: 89.5 -> 43.8 ms per step; 1 H200, fp8: 90.3 -> 85.8 ms; not for fp8 models whose
    # prompt length varies, see should_graph). A 1-GPU bf16 step measured no gain. Not with
    # layerwise offload.
    cuda_graphs: bool | None = None
    # How a graphed Ulysses forward moves q / k / v: "copy-engine" copies them into the peers'
    # memory (torch symmetric memory) beside the single blocks' MLP GEMM, where NCCL's kernel
    # waits for the GEMM's SMs (services/denoiser/parallel/copy_exchange.py): Flux 1024x1024
    # Ulysses-2, 2x H200, 72.0 -> 69.3 ms a step (same run). Not the default yet: a rank's death
    # fails the request and the replica is rebuilt (2x H200), but a replica built again in the
    # same process runs with NCCL exchanges, as torch's symmetric memory cannot be set up again
    # there with fresh followers (copy_exchange.set_up_here); not yet measured for Qwen-Image /
    # Z-Image.
    ulysses_exchange: Literal["nccl", "copy-engine"] = "nccl"
    # Weights in pinned host memory, each block copied in ahead of use (services/denoiser/offload.py).
    layerwise_offload: bool = False
    offload_prefetch: int = Field(1, ge=1, description="blocks copied ahead of the one computing")

    @model_validator(mode="after")
    def _graphs_without_offload(self):
        if self.cuda_graphs and self.layerwise_offload:
            raise ValueError("cuda_graphs and layerwise_offload cannot be combined: the offload's per-block "
                             "copies and their events run outside any graph")
        return self

    @property
    def world_size(self) -> int:
        return (2 if self.cfg_parallel else 1) * self.ring_degree * self.ulysses_degree * self.tp_size

    def options(self) -> dict:
        return {k: getattr(self, k) for k in DenoiserOptions.model_fields}


class DenoiserConfig(StageConfig, DenoiserOptions):
    """The denoiser stage: where it runs and how one replica spreads over ranks."""


class EncoderOptions(BaseModel):
    """How one encoder replica runs (shared by its stage config and the serve config's encoder pool)."""

    model_config = ConfigDict(extra="forbid")

    # Tensor parallelism of the T5 text encoder over this many ranks (one GPU each), for when its
    # weights do not fit one GPU beside the rest (T5-XXL: ~9.5 GB in bf16). CLIP stays
    # replicated (small). Must divide T5's head count and feed-forward width.
    tp_size: int = Field(1, ge=1)

    @property
    def world_size(self) -> int:
        return self.tp_size

    def options(self) -> dict:
        return {k: getattr(self, k) for k in EncoderOptions.model_fields}


class EncoderConfig(StageConfig, EncoderOptions):
    """The encoder stage."""


class VaeOptions(BaseModel):
    """How one VAE worker runs (shared by its stage config and the serve config's vae pool)."""

    model_config = ConfigDict(extra="forbid")

    # "WIDTHxHEIGHT" sizes decoded once at start (cuDNN picks its convolution algorithms, the
    # allocator grows to the decode's size), so the first request at that size pays neither.
    # `--warmup-resolutions` sets this and the denoiser's together.
    warmup_resolutions: WarmupSizes = Field(default_factory=list)

    def options(self) -> dict:
        return {k: getattr(self, k) for k in VaeOptions.model_fields}


class VaeConfig(StageConfig, VaeOptions):
    """The VAE stage."""


def validated(model_cls: type[BaseModel], fields: dict):
    """`model_cls` built from `fields`, or one InvalidRequestError naming the first bad field."""
    try:
        return model_cls.model_validate(fields)
    except ValidationError as exc:
        raise invalid_request_from(exc) from None


def invalid_request_from(exc: ValidationError) -> InvalidRequestError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return InvalidRequestError(f"invalid {param}: {msg}" if param else msg, param)


class Autoscaling(BaseModel):
    """Ray Serve autoscaling for one pool (replaces num_replicas when set)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)


class Deployment(BaseModel):
    """How a pool runs under Ray Serve: replicas and the resources each one holds."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    # Logical CPUs per replica; 0 lets several pools share a small head node (the work is on
    # the GPU, or on the CPU threads torch starts regardless of this number).
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    def ray_options(self) -> dict:
        opts: dict = {"ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class RouterConfig(Deployment):
    """The router: batching window and limits, deadlines (and, under Ray, its pool)."""

    # How long a request waits for batch companions. Small next to a step (~100 ms on a GPU).
    batch_window_ms: float = Field(10.0, ge=0)
    max_batch_size: int = Field(4, ge=1, description="images per denoiser batch")
    max_queue: int = Field(64, ge=1, description="requests waiting for a batch before 429")
    request_timeout_s: float = Field(600.0, gt=0, description="default per-request deadline")
    # The DiT cache policy of requests that set none (e.g. {"preset": "fast"}); None: no caching.
    cache: CachePolicy | None = None


class StageEndpoint(Deployment):
    """One stage pool: Ray Serve replicas, or (without Ray) in this process or a gRPC worker."""

    address: str | None = None  # host:port of a `ditserve worker` (no-Ray mode only)


class MultiRankEndpoint(StageEndpoint):
    """A pool whose replicas may span several ranks (`world_size`, from the pool's options)."""

    def ray_options(self) -> dict:
        """A multi-rank replica owns a placement group: one bundle per rank (num_cpus / num_gpus
        each), on one node; the replica runs in bundle 0, its other ranks in the rest."""
        opts = super().ray_options()
        if self.world_size > 1:
            bundle = {"CPU": max(self.num_cpus, 0.01)}  # Ray refuses empty bundles
            if self.num_gpus:
                bundle["GPU"] = self.num_gpus
            opts["placement_group_bundles"] = [bundle] * self.world_size
            opts["placement_group_strategy"] = "STRICT_PACK"
            opts["ray_actor_options"] = {"num_cpus": bundle["CPU"], "num_gpus": self.num_gpus}
        return opts


class EncoderEndpoint(MultiRankEndpoint, EncoderOptions):
    """The encoder pool; each replica may span tp_size ranks (see EncoderOptions)."""


class DenoiserEndpoint(MultiRankEndpoint, DenoiserOptions):
    """The denoiser pool; each replica may span several ranks (see DenoiserOptions)."""


class VaeEndpoint(StageEndpoint, VaeOptions):
    """The VAE pool."""


class ServeConfig(BaseModel):
    """`ditserve serve`: one schema for CLI flags and the --config YAML file."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path | None = None
    served_model_name: str | None = None  # default: the model directory's name
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, lt=65536)
    grpc_port: int = Field(9000, ge=0, lt=65536)
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    backend: Backend = "auto"  # as StageConfig.backend
    # Video models: the SQLite file of /v1/videos jobs (kept across restarts); None:
    # ~/.cache/ditserve/videos.sqlite3. Mount a volume there in a container.
    video_jobs_path: Path | None = None
    # Ray Serve (the default) deploys every pool on a Ray cluster: a new local one when
    # ray_address is None. ray=False runs the router in this process, each stage in-process or
    # at its gRPC `address`.
    ray: bool = True
    ray_address: str | None = None
    gateway: Deployment = Field(default_factory=Deployment)
    router: RouterConfig = Field(default_factory=RouterConfig)
    encoder: EncoderEndpoint = Field(default_factory=EncoderEndpoint)
    denoiser: DenoiserEndpoint = Field(default_factory=DenoiserEndpoint)
    vae: VaeEndpoint = Field(default_factory=VaeEndpoint)

    @model_validator(mode="after")
    def _addresses_need_no_ray(self) -> "ServeConfig":
        if self.ray and any(getattr(self, r).address for r in ("encoder", "denoiser", "vae")):
            raise ValueError("stage addresses are for ray: false (standalone workers); Ray places the pools itself")
        return self

    def check_ranks(self, stages: tuple[str, ...], in_process: bool) -> None:
        """Refuse, before any weights load, multi-rank settings this model or layout cannot take.
        `stages`: the pipeline spec's stages; `in_process`: stages without an address run in this
        process (no Ray)."""
        if "encoder" not in stages and self.encoder.tp_size > 1:
            raise InvalidRequestError("encoder tp_size: this model runs whole in the denoiser worker (no encoder "
                                      "stage to split)", "encoder.tp_size")
        local = [r for r in ("encoder", "denoiser") if r in stages and getattr(self, r).world_size > 1
                 and not getattr(self, r).address]
        if in_process and len(local) > 1:
            # Each multi-rank stage owns its process's torch.distributed default group.
            raise InvalidRequestError(
                "a multi-rank encoder and a multi-rank denoiser cannot share one process: run the encoder as "
                "`ditserve worker --role encoder --tp-size T` (--encoder-address), or serve with Ray", "encoder.tp_size")

    def video_jobs_file(self) -> Path:
        return self.video_jobs_path or Path.home() / ".cache" / "ditserve" / "videos.sqlite3"

    def stage_config(self, role: str = "encoder") -> StageConfig:
        base = dict(model_path=self.model_path, device=self.device, dtype=self.dtype, backend=self.backend)
        if role == "denoiser":
            return DenoiserConfig(**base, **self.denoiser.options())
        if role == "vae":
            return VaeConfig(**base, **self.vae.options())
        return EncoderConfig(**base, **self.encoder.options())


def stage_config_class(role: str) -> type[StageConfig]:
    """The typed config of a stage worker of `role` (encoder / denoiser / vae)."""
    return {"encoder": EncoderConfig, "denoiser": DenoiserConfig, "vae": VaeConfig}[role]
