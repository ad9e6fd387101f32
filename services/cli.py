"""`ditserve` command line: wires stages, router and output together.

    ditserve generate [--model-path DIR] --prompt P [options] --output out.png
    ditserve serve [--model-path DIR] [--config FILE] [--ray-address ADDR | --no-ray ...]
    ditserve worker --role encoder|denoiser|vae [--model-path DIR] --grpc-port P

Bad input (missing model, bad size, unwritable output, ...) prints one line and exits 2;
`--verbose` adds library logs and tracebacks."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from pathlib import Path

from services import __version__
from services.runtime.errors import DitserveError, InvalidRequestError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images in this process (all stages in-process)")
    p.add_argument("--model-path", help="diffusers-format model directory (default: the embedded tiny model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt",
                   help="used for true CFG when --true-cfg-scale > 1 (Z-Image: --guidance-scale > 0; Wan: > 1)")
    p.add_argument("--true-cfg-scale", type=float, help="default: the model's (Flux 1.0: off)")
    p.add_argument("--seed", type=int, help="seed of the first image (image i uses seed + i); random if omitted")
    p.add_argument("--num-inference-steps", type=int, help="default: the model's (28 for Flux.1-dev)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 16 for Flux (default: the model's)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 16 for Flux (default: the model's)")
    p.add_argument("--guidance-scale", type=float,
                   help="distilled guidance (default: the model's, 3.5 for dev); the CFG scale of Z-Image, "
                        "Wan and Flux.2 [klein]")
    p.add_argument("--guidance-scale-2", type=float,
                   help="two-expert models (Wan 2.2 A14B): the low-noise expert's CFG scale (default: --guidance-scale)")
    p.add_argument("--max-sequence-length", type=int, help="text tokens (default: the model's)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt; files get a -N suffix")
    p.add_argument("--lora-path", action="append", default=[], metavar="FILE",
                   help="a LoRA safetensors file (any common Flux format); repeat to stack adapters")
    p.add_argument("--lora-scale", action="append", type=float, default=[], metavar="S",
                   help="strength of the matching --lora-path, in order (default 1.0)")
    _add_cache_flags(p, "this request")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, else float32")
    _add_backend_flag(p)
    _add_encoder_flags(p)
    _add_denoiser_flags(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="input image of edit / image-to-image / image-to-video models (repeat for several)")
    p.add_argument("--mask", metavar="PATH", help="inpainting mask (white = repaint)")
    p.add_argument("--num-frames", type=int, help="video models: frames per clip (default: the model's)")
    p.add_argument("--fps", type=int, help="video models: the MP4's frame rate (default: the model's)")
    p.add_argument("--output", "-o", default="out.png",
                   help="output file (.png, .jpg, .webp; video: .mp4, or DIR/ for numbered PNG frames)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_generate)


def _add_backend_flag(p) -> None:
    p.add_argument("--backend", choices=["auto", "native", "diffusers"],
                   help="auto (default): the native family where one matches the pipeline class, else the whole "
                        "diffusers pipeline in the denoiser worker; diffusers forces that")


def _add_encoder_flags(p) -> None:
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder-tp-size", type=int,
                   help="T5 tensor parallelism over this many ranks (must divide T5's heads and d_ff); CLIP stays whole")


def _encoder_options(args) -> dict:
    return {"tp_size": args.encoder_tp_size} if args.encoder_tp_size is not None else {}


def _add_denoiser_flags(p) -> None:
    """The DenoiserOptions fields as flags; unset ones keep the config's value (serve) or the default."""
    g = p.add_argument_group("denoiser parallelism (ranks = cfg x ring x ulysses x tp; CPU processes without CUDA)")
    g.add_argument("--ulysses-degree", type=int, help="Ulysses sequence parallelism (all-to-all)")
    g.add_argument("--ring-degree", type=int, help="ring attention sequence parallelism")
    g.add_argument("--tp-size", type=int, help="tensor parallelism (must divide the head count); `worker --role "
                                               "encoder`: T5's, over that many ranks")
    g.add_argument("--cfg-parallel", action="store_true", default=None,
                   help="true-CFG branches on different ranks (x2 ranks)")
    g = p.add_argument_group("denoiser speed and memory")
    g.add_argument("--dit-precision", dest="precision", choices=["default", "fp8"],
                   help="fp8: e4m3 linears with row-wise scales (Hopper or newer); default: the --dtype")
    g.add_argument("--dit-attention-precision", dest="attention_precision", choices=["default", "fp8"],
                   help="fp8: attention in cuDNN's fp8 kernel (Hopper or newer, ditserve[fp8-attention]); "
                        "pays on long sequences (video, 2048x2048)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the DiT blocks (default: on with CUDA)")
    g.add_argument("--compile-cache-dir", help="persistent compile cache, so a restart skips compiling")
    g.add_argument("--warmup-resolutions", nargs="+", metavar="WxH", help="sizes to compile and run once at start")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each DiT forward as a CUDA graph (default: on for a compiled multi-GPU or fp8 replica)")
    g.add_argument("--ulysses-exchange", choices=["nccl", "copy-engine"],
                   help="how graphed Ulysses forwards move q/k/v (default nccl; copy-engine hides it under a GEMM; "
                        "a replica built again in the same process, as after a rank died, uses nccl)")
    g.add_argument("--dit-layerwise-offload", dest="layerwise_offload", action="store_true", default=None,
                   help="DiT weights in pinned host memory, each block copied in while the previous one runs")
    g.add_argument("--offload-prefetch", type=int, help="blocks copied ahead (default 1)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-dir", help="request LoRA paths resolve here; nothing outside it is read")
    g.add_argument("--max-loras", type=int, help="adapters a denoiser replica keeps loaded (default 8)")


_CACHE_FLAGS = {  # flag -> CachePolicy field
    "--cache-preset": "preset", "--cache-fn-compute-blocks": "Fn_compute_blocks",
    "--cache-bn-compute-blocks": "Bn_compute_blocks", "--cache-residual-diff-threshold": "residual_diff_threshold",
    "--cache-max-warmup-steps": "max_warmup_steps", "--cache-max-cached-steps": "max_cached_steps",
    "--cache-max-continuous-cached-steps": "max_continuous_cached_steps",
    "--cache-taylorseer-order": "taylorseer_order",
}


def _add_cache_flags(p, what: str) -> None:
    g = p.add_argument_group(f"DiT cache ({what}; DBCache semantics, see README)")
    for flag, field in _CACHE_FLAGS.items():
        if field == "preset":
            g.add_argument(flag, dest="cache_preset", choices=["off", "slow", "medium", "fast", "ultra"])
        else:
            g.add_argument(flag, dest=f"cache_{field}", type=float if "threshold" in field else int)


def _cache_policy(args) -> dict | None:
    fields = {f: getattr(args, f"cache_{f}") for f in _CACHE_FLAGS.values() if getattr(args, f"cache_{f}") is not None}
    if not fields:
        return None
    if fields.get("preset") == "off":
        return {"enabled": False}
    return fields


_FLAG_NAMES = {"precision": "--dit-precision", "attention_precision": "--dit-attention-precision",
               "layerwise_offload": "--dit-layerwise-offload"}
_DENOISER_FLAGS = ("ulysses_degree", "ring_degree", "tp_size", "cfg_parallel", "precision", "attention_precision",
                   "compile", "cuda_graphs", "ulysses_exchange", "compile_cache_dir", "warmup_resolutions",
                   "layerwise_offload", "offload_prefetch", "lora_dir", "max_loras")


def _denoiser_options(args) -> dict:
    return {k: getattr(args, k) for k in _DENOISER_FLAGS if getattr(args, k) is not None}


def _output_paths(output: str, n: int, video: bool = False) -> tuple[list[Path], str]:
    """The files (or, for video frames, directories) to write, and the format: an image
    format, "mp4", or "frames" (a directory of numbered PNGs)."""
    from services.gateway.images import format_for_path

    path = Path(output)
    if video:
        fmt = "frames" if output.endswith(("/", os.sep)) or path.is_dir() else "mp4" if path.suffix == ".mp4" else None
        if fmt is None:
            raise InvalidRequestError(f"a video model writes .mp4, or a directory (ending in /) of PNG frames, not "
                                      f"'{output}'", "output")
    else:
        fmt = format_for_path(path.suffix)
        if fmt is None:
            raise InvalidRequestError(f"unsupported output extension '{path.suffix}' (use .png, .jpg or .webp)",
                                      "output")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidRequestError(f"output directory does not exist: {parent}", "output")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidRequestError(f"output path is not writable: {path}", "output")
    if n == 1:
        return [path], fmt
    if fmt == "frames":
        return [path / f"video-{i}" for i in range(n)], fmt
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)], fmt


def _read_input(path: str, param: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read --{param} {path}: {exc.strerror}", param) from None


def _write_output(path: Path, pixels, fmt: str, fps: int) -> None:
    from services.gateway.images import encode_image
    from services.gateway.video import encode_mp4, write_png_frames

    if fmt == "frames":
        write_png_frames(pixels, path)
    elif fmt == "mp4":
        path.write_bytes(encode_mp4(pixels, fps))
    else:
        path.write_bytes(encode_image(pixels, fmt))


def _lora_refs(paths: list[str], scales: list[float]) -> list[dict]:
    if len(scales) > len(paths):
        raise InvalidRequestError(f"{len(scales)} --lora-scale values for {len(paths)} --lora-path files", "lora_scale")
    scales = scales + [1.0] * (len(paths) - len(scales))
    # The file's stem labels the adapter in errors; it need only be a valid adapter name.
    return [dict(name=re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(p).stem).lstrip("._-") or "lora", path=p, strength=s)
            for p, s in zip(paths, scales)]


def _generate(args) -> int:
    # Check everything we can before loading weights, so bad input fails in milliseconds.
    from services.router.requests import resolve_request
    from services.runtime.config import GenerateRequest, StageConfig
    from services.runtime.registry import resolve

    config = StageConfig(model_path=args.model_path, device=args.device, dtype=args.dtype,
                         backend=args.backend or "auto")
    model, spec = resolve(config.model_path, config.backend)
    video = "video" in spec.features
    paths, fmt = _output_paths(args.output, args.num_images, video)
    request = GenerateRequest.parse(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance_scale,
        guidance_scale_2=args.guidance_scale_2,
        max_sequence_length=args.max_sequence_length,
        n=args.num_images,
        output_format=fmt if not video else "png",
        lora=_lora_refs(args.lora_path, args.lora_scale),
        cache=_cache_policy(args),
        num_frames=args.num_frames,
        fps=args.fps,
        images=[_read_input(p, "image") for p in args.image],
        mask=_read_input(args.mask, "mask") if args.mask else None,
    )
    resolve_request(request, model, spec)  # size / length errors before the slow loads
    router = build_in_process_router(config, denoiser_options=_denoiser_options(args),
                                     encoder_options=_encoder_options(args))

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=0, desc="denoising", unit="step", file=sys.stderr, leave=False)

    def on_step(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(1)

    try:
        result = asyncio.run(router.generate(request, on_step=on_step))
    finally:
        if bar is not None:
            bar.close()
    r = result.request
    for path, image in zip(paths, result.images):
        try:
            _write_output(path, image.pixels, fmt, r.fps)
        except OSError as exc:
            raise InvalidRequestError(f"cannot write {path}: {exc.strerror}", "output") from None
        frames = f"  {r.num_frames} frames at {r.fps} fps" if r.num_frames else ""
        print(f"{path}  seed={image.seed}  {r.width}x{r.height}{frames}")
    stages = "  ".join(
        f"{name} {m.seconds:.2f}s peak {m.peak_memory_bytes / 2**20:.0f} MiB" for name, m in result.stages.items()
    )
    steps = f"{result.request.num_inference_steps} steps"
    if result.cache_stats is not None:
        steps += f" ({result.cache_stats.computed_steps} computed, {result.cache_stats.cached_steps} from the DiT cache)"
    print(f"{steps}, total {result.total_seconds:.2f}s  ({stages})")
    return 0


# role -> (stage class, gRPC servicer class, gRPC service name), each in services/<role>/.
_ROLES = {
    "encoder": ("EncoderStage", "EncoderService", "Encoder"),
    "denoiser": ("DenoiserStage", "DenoiserService", "Denoiser"),
    "vae": ("VaeStage", "VaeService", "Vae"),
}


def _add_worker(sub) -> None:
    p = sub.add_parser("worker", help="serve one stage (encoder | denoiser | vae) over gRPC")
    p.add_argument("--role", required=True, choices=["encoder", "denoiser", "vae"])
    p.add_argument("--model-path", help="diffusers-format model directory (default: the embedded tiny model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=0, help="0 picks a free port (printed when ready)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    _add_backend_flag(p)
    _add_denoiser_flags(p)
    p.set_defaults(func=_worker)


def _worker(args) -> int:
    import importlib
    import signal
    import threading

    from services.runtime.config import DenoiserConfig, stage_config_class
    from services.runtime.grpc_server import start_server

    base = dict(model_path=args.model_path, device=args.device, dtype=args.dtype, backend=args.backend or "auto")
    options = _denoiser_options(args)
    if args.role == "vae":  # the VAE decodes the warm-up sizes once; every other option is the DiT's
        base["warmup_resolutions"] = options.pop("warmup_resolutions", [])
    if args.role == "encoder" and "tp_size" in options:  # T5's tensor parallelism
        base["tp_size"] = options.pop("tp_size")
    if args.role == "denoiser":
        config = DenoiserConfig(**base, **options)
    elif options:
        flags = ", ".join(_FLAG_NAMES.get(k, "--" + k.replace("_", "-")) for k in options)
        raise InvalidRequestError(f"{flags}: denoiser options, not for --role {args.role}")
    else:
        config = stage_config_class(args.role)(**base)
    stage_cls, service_cls, grpc_name = _ROLES[args.role]
    stage = getattr(importlib.import_module(f"services.{args.role}.stage"), stage_cls)(config)
    service = getattr(importlib.import_module(f"services.{args.role}.service"), service_cls)(stage)
    server, port = start_server([service.add_to], [f"ditserve.v1.{grpc_name}"], args.host, args.grpc_port)
    print(f"ditserve worker {args.role} ready on {args.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-style REST API and the gRPC API")
    p.add_argument("--config", help="YAML file with the ServeConfig schema (flags override it)")
    p.add_argument("--model-path")
    p.add_argument("--served-model-name")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    _add_backend_flag(p)
    p.add_argument("--video-jobs-path", help="video models: SQLite file of /v1/videos jobs "
                                             "(default ~/.cache/ditserve/videos.sqlite3)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local Ray)")
    p.add_argument("--no-ray", action="store_true", help="no Ray: router in this process, stages in-process or --*-address")
    for stage in ("encoder", "denoiser", "vae"):
        p.add_argument(f"--{stage}-address", help=f"with --no-ray: host:port of a `ditserve worker --role {stage}`")
    _add_encoder_flags(p)
    _add_denoiser_flags(p)
    _add_cache_flags(p, "the default of requests that set none")
    p.set_defaults(func=_serve)


def serve_config_from_args(args):
    import yaml

    from services.runtime.config import ServeConfig, invalid_request_from

    data: dict = {}
    if args.config:
        try:
            data = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidRequestError(f"cannot read config {args.config}: {exc}", "config") from None
    if isinstance(data, dict) and "applications" in data:
        data = _from_ray_serve_config(data)
    if args.no_ray:
        data["ray"] = False
    for key in ("model_path", "served_model_name", "host", "port", "grpc_port", "device", "dtype", "backend",
                "ray_address", "video_jobs_path"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if _denoiser_options(args):
        data.setdefault("denoiser", {}).update(_denoiser_options(args))
    if _encoder_options(args):
        data.setdefault("encoder", {}).update(_encoder_options(args))
    if args.warmup_resolutions:
        data.setdefault("vae", {})["warmup_resolutions"] = args.warmup_resolutions
    if _cache_policy(args) is not None:
        data.setdefault("router", {})["cache"] = _cache_policy(args)
    for stage in ("encoder", "denoiser", "vae"):
        address = getattr(args, f"{stage}_address")
        if address:
            data.setdefault(stage, {})["address"] = address
    try:
        return ServeConfig(**data)
    except Exception as exc:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            raise invalid_request_from(exc) from None
        raise


def _from_ray_serve_config(raw: dict) -> dict:
    """A Ray Serve config file (deploy/serve.yaml): ditserve's settings are the application's
    `args`; host and ports come from its http_options / grpc_options."""
    apps = raw.get("applications") or []
    if len(apps) != 1:
        raise InvalidRequestError("a Ray Serve config for ditserve must hold exactly one application", "config")
    data = dict(apps[0].get("args") or {})
    http, grpc_opts = raw.get("http_options") or {}, raw.get("grpc_options") or {}
    for key, value in (("host", http.get("host")), ("port", http.get("port")), ("grpc_port", grpc_opts.get("port"))):
        if value is not None:
            data.setdefault(key, value)
    return data


def build_router(config, allow_any_lora_path: bool = False):
    """The router with each stage in-process or behind its gRPC worker, as `config` says.
    `allow_any_lora_path`: request LoRA paths need no --lora-dir (`generate`: the user's files)."""
    import importlib

    from services.router.loras import lora_resolver
    from services.router.router import Router
    from services.runtime import grpc_client, stage_client
    from services.runtime.registry import resolve

    model, spec = resolve(config.model_path, config.backend)
    config.check_ranks(spec.stages, in_process=True)
    clients = {}
    for role, (stage_cls, _, grpc_name) in _ROLES.items():
        endpoint = getattr(config, role)
        if role not in spec.stages:  # e.g. the diffusers backend: the denoiser runs it all
            clients[role] = None
        elif endpoint.address:
            clients[role] = getattr(grpc_client, f"Grpc{grpc_name}Client")(endpoint.address)
        else:
            stage = getattr(importlib.import_module(f"services.{role}.stage"), stage_cls)(config.stage_config(role))
            clients[role] = getattr(stage_client, f"InProcess{grpc_name}")(stage)
    loras = lora_resolver(model, spec, config.denoiser.lora_dir, allow_any_lora_path)
    return Router(model, spec, clients["encoder"], clients["denoiser"], clients["vae"], config.router, loras)


def _serve(args) -> int:
    config = serve_config_from_args(args)
    if config.ray:
        return run_ray_server(config)
    return asyncio.run(run_server(config))


def run_ray_server(config) -> int:
    """Deploy the Ray Serve application (services/ray_app.py) and wait for SIGTERM/SIGINT."""
    import signal
    import threading
    import time

    import ray
    from ray import serve

    from services.ray_app import GRPC_SERVICER_FUNCTIONS, app_builder
    from services.runtime.registry import resolve

    model, _ = resolve(config.model_path, config.backend)  # fail fast on a bad path, before starting Ray
    t0 = time.perf_counter()
    ray.init(address=config.ray_address, include_dashboard=False, logging_level="WARNING",
             configure_logging=True, namespace="ditserve")
    serve.start(
        http_options={"host": config.host, "port": config.port},
        grpc_options={"port": config.grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
    )
    serve.run(app_builder(config.model_dump(mode="json")), name="ditserve", route_prefix="/")
    name = config.served_model_name or model.path.name
    print(f"ditserve serving '{name}' on http://{config.host}:{config.port} (REST) and {config.host}:{config.grpc_port} "
          f"(gRPC) with Ray Serve, up in {time.perf_counter() - t0:.1f}s", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if config.ray_address is None:
        ray.shutdown()  # our own local cluster: stopping it stops every replica with it
    else:
        serve.delete("ditserve")  # a shared cluster: remove our application, leave the rest
        ray.shutdown()
    return 0


async def run_server(config, ready: "asyncio.Event | None" = None) -> int:
    """REST (uvicorn) and public gRPC in one event loop until SIGTERM/SIGINT."""
    import signal
    import time

    import uvicorn

    from services.gateway.grpc_api import start_public_grpc
    from services.gateway.rest import ModelCard, create_app
    from services.gateway.videos import VideoJobs

    router = build_router(config)
    card = ModelCard(
        id=config.served_model_name or router.model.path.name,
        family=router.spec.family,
        pipeline_class=router.model.pipeline_class,
        created=int(time.time()),
        video="video" in router.spec.features,
    )
    videos = VideoJobs(router, card.id, config.video_jobs_file()) if card.video else None
    grpc_server, grpc_port = await start_public_grpc(router, card, config.host, config.grpc_port)
    server = uvicorn.Server(
        uvicorn.Config(create_app(router, card, videos=videos), host=config.host, port=config.port, log_level="warning")
    )
    server.install_signal_handlers = lambda: None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    serve_task = asyncio.ensure_future(server.serve())
    while not server.started and not serve_task.done():
        await asyncio.sleep(0.05)
    if serve_task.done():  # bind failure etc.
        await grpc_server.stop(0)
        serve_task.result()
        raise OSError(f"REST server failed to start on {config.host}:{config.port}")
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"ditserve serving '{card.id}' on http://{config.host}:{port} (REST) and {config.host}:{grpc_port} (gRPC)",
          flush=True)
    await serve_task
    await grpc_server.stop(grace=5)
    return 0


def build_in_process_router(config, router_config=None, denoiser_options: dict | None = None,
                            encoder_options: dict | None = None):
    """All three stages in this process behind the router (`generate`, tests); a multi-rank
    stage's extra ranks are processes of its own."""
    from services.runtime.config import RouterConfig, ServeConfig

    return build_router(
        ServeConfig(model_path=config.model_path, device=config.device, dtype=config.dtype, backend=config.backend,
                    router=router_config or RouterConfig(), encoder=encoder_options or {},
                    denoiser=denoiser_options or {},
                    vae={"warmup_resolutions": (denoiser_options or {}).get("warmup_resolutions", [])}),
        allow_any_lora_path=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditserve", description="Serve and run diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"ditserve {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_worker(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    from pydantic import ValidationError

    from services.runtime.config import invalid_request_from

    try:
        try:
            return args.func(args)
        except ValidationError as exc:  # a config built from flags: bad input, said in one line
            raise invalid_request_from(exc) from None
    except DitserveError as exc:
        if args.verbose:
            raise
        print(f"ditserve: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("ditserve: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so in one line, traceback with --verbose
        if args.verbose:
            raise
        print(f"ditserve: internal error: {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    sys.exit(main())
