"""The Ray Serve application: gateway -> router -> encoder / denoiser / VAE pools.

    serve run deploy/serve.yaml            # Ray Serve's own CLI
    ditserve serve [--ray-address ADDR]    # the same application from ditserve

Each pool is a deployment whose replicas hold one stage object, the same class that runs
in-process and behind `ditserve worker`; the router reaches them through deployment handles
(services.runtime.ray_client). `app_builder(args)` takes the ServeConfig schema, so a Ray Serve
YAML, ditserve's --config file and the Helm values are views of one schema."""

from __future__ import annotations

import importlib
import time

from ray import serve

from services.runtime.config import ServeConfig, stage_config_class
from services.runtime.streams import with_progress

# role -> (module, stage class, in-process client class)
_STAGES = {
    "encoder": ("services.encoder.stage", "EncoderStage", "InProcessEncoder"),
    "denoiser": ("services.denoiser.stage", "DenoiserStage", "InProcessDenoiser"),
    "vae": ("services.vae.stage", "VaeStage", "InProcessVae"),
}


class StageDeployment:
    """One replica of a stage pool; calls are serialised on the stage like in every transport."""

    def __init__(self, role: str, stage_config: dict):
        from services.runtime import stage_client

        module, stage_cls, client_cls = _STAGES[role]
        config = stage_config_class(role)(**stage_config)
        # A multi-rank replica (a parallel denoiser, a tensor-parallel encoder) owns a placement
        # group of one bundle per rank (config.py, MultiRankEndpoint) and starts its other ranks
        # as Ray actors in it (services/runtime/ray_ranks.py).
        stage = getattr(importlib.import_module(module), stage_cls)(config)
        self.client = getattr(stage_client, client_cls)(stage)

    async def ready(self) -> bool:
        return True

    async def encode(self, request):
        return await self.client.encode(request)

    async def decode(self, request):
        return await self.client.decode(request)

    async def encode_images(self, request):
        return await self.client.encode_images(request)

    async def denoise_stream(self, request):
        lora_set = serve.get_multiplexed_model_id()
        if lora_set:
            await self._holds_lora_set(lora_set)
        async for item in with_progress(lambda on_step: self.client.denoise(request, on_step)):
            yield item

    # One: a denoiser keeps exactly the last LoRA set it merged (services/denoiser/lora/apply.py).
    @serve.multiplexed(max_num_models_per_replica=1)
    async def _holds_lora_set(self, lora_set: str) -> str:
        """Tells Ray Serve's router that this replica now holds `lora_set` merged, so batches
        with the same set come back here (the merge itself happens when the batch runs)."""
        return lora_set


class RouterDeployment:
    def __init__(self, config: dict, encoder, denoiser, vae):
        from services.router.loras import lora_resolver
        from services.router.router import Router
        from services.runtime.ray_client import RayStageClient
        from services.runtime.registry import resolve

        cfg = ServeConfig(**config)
        model, spec = resolve(cfg.model_path, cfg.backend)
        self.router = Router(
            model,
            spec,
            RayStageClient("encoder", encoder) if encoder is not None else None,
            RayStageClient("denoiser", denoiser),
            RayStageClient("vae", vae) if vae is not None else None,
            cfg.router,
            lora_resolver(model, spec, cfg.denoiser.lora_dir),
        )

    async def ready(self) -> dict[str, bool]:
        return await self.router.ready()

    async def lora_admin(self, op: str, **fields) -> dict:
        return await self.router.lora_admin(op, **fields)

    async def check(self, request):
        return await self.router.check(request)

    async def metrics_text(self) -> str:
        return await self.router.metrics_text()

    async def generate_stream(self, request, timeout_s: float | None):
        async for item in with_progress(lambda on_step: self.router.generate(request, on_step, timeout_s)):
            yield item


class _Aborted(Exception):
    pass


class _RayGrpcContext:
    """The slice of grpc.aio's ServicerContext that GenerationService uses, over Ray's proxy context."""

    def __init__(self, ctx):
        self.ctx = ctx

    def time_remaining(self):
        return None  # Ray's proxy does not expose the client deadline; the router default applies

    def set_trailing_metadata(self, metadata):
        self.ctx.set_trailing_metadata(list(metadata))

    async def abort(self, code, details):
        self.ctx.set_code(code)
        self.ctx.set_details(details)
        raise _Aborted(details)


@serve.ingress()
class GatewayDeployment:
    """REST (FastAPI, through Ray's HTTP proxy) and the public gRPC API (through Ray's gRPC proxy)."""

    def __init__(self, router, config: dict):
        from services.gateway.grpc_api import GenerationService
        from services.gateway.rest import ModelCard
        from services.runtime.ray_client import RayRouterClient
        from services.runtime.registry import resolve

        cfg = ServeConfig(**config)
        model, spec = resolve(cfg.model_path, cfg.backend)  # metadata only: the gateway loads no weights
        self.card = ModelCard(cfg.served_model_name or model.path.name, spec.family, model.pipeline_class,
                              int(time.time()), video="video" in spec.features)
        self.video_jobs_path = cfg.video_jobs_file()
        self.router = RayRouterClient(router)
        self.grpc = GenerationService(self.router, self.card)

    def __serve_build_asgi_app__(self):
        from services.gateway.rest import create_app
        from services.gateway.videos import VideoJobs

        videos = VideoJobs(self.router, self.card.id, self.video_jobs_path) if self.card.video else None
        return create_app(self.router, self.card, videos=videos)

    async def Generate(self, request, grpc_context):
        from services.runtime.proto import generation_pb2

        try:
            return await self.grpc.Generate(request, _RayGrpcContext(grpc_context))
        except _Aborted:
            return generation_pb2.GenerateResponse()

    async def GenerateStream(self, request, grpc_context):
        try:
            async for event in self.grpc.GenerateStream(request, _RayGrpcContext(grpc_context)):
                yield event
        except _Aborted:
            return

    async def ListModels(self, request, grpc_context):
        return await self.grpc.ListModels(request, _RayGrpcContext(grpc_context))

    async def Check(self, request, grpc_context):
        """grpc.health.v1.Health/Check through Ray's proxy: SERVING only when every stage answers."""
        from grpc_health.v1 import health_pb2

        ready = await self.router.ready()
        ok = all(ready.values())
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


GRPC_SERVICER_FUNCTIONS = [
    "services.runtime.proto.generation_pb2_grpc.add_GenerationServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


def app_builder(args: dict):
    """Ray Serve application builder: `import_path: services.ray_app:app_builder`, args = ServeConfig."""
    from services.runtime.registry import resolve

    cfg = ServeConfig(**(args or {}))
    config = cfg.model_dump(mode="json")
    _, spec = resolve(cfg.model_path, cfg.backend)  # which pools the model needs (the diffusers backend: one)
    cfg.check_ranks(spec.stages, in_process=False)
    stages = {
        role: serve.deployment(StageDeployment, name=role, **getattr(cfg, role).ray_options()).bind(
            role, cfg.stage_config(role).model_dump(mode="json")
        ) if role in spec.stages else None
        for role in _STAGES
    }
    router = serve.deployment(RouterDeployment, name="router", **cfg.router.ray_options()).bind(
        config, stages["encoder"], stages["denoiser"], stages["vae"]
    )
    return serve.deployment(GatewayDeployment, name="gateway", **cfg.gateway.ray_options()).bind(router, config)
