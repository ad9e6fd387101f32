"""Prometheus metrics: base units, `ditserve_` prefix, one registry per process.

Where they are measured and where they are served:
- stage numbers (seconds, peak device memory per rank, denoise steps, cached steps, LoRA loads
  and hits) are measured on the stage worker, travel back in each stage response
  (StageMetrics / DenoiseResponse) and are recorded by the process that runs the router;
- router numbers (queue depth, batch sizes, per-stage latency seen by the router) are recorded
  in that same process;
- the gateway records request latency and serves GET /metrics. Without Ray the router runs in
  the gateway process, so that registry has everything; under Ray Serve the router is its own
  deployment and the gateway appends the router replica's exposition to its own (fetched over
  the deployment handle), so one scrape target still has every series. Workers need no scrape
  config of their own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The gateway's own series, and the router's (stages included): two registries, because under
# Ray they live in two processes and the gateway's /metrics concatenates both expositions.
REGISTRY = CollectorRegistry(auto_describe=True)
ROUTER_REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5)
_MEMORY_BUCKETS = tuple(2**k for k in range(24, 39))  # 16 MiB .. 256 GiB

REQUESTS = Counter(
    "ditserve_requests", "Requests handled", ["endpoint", "model", "status"], registry=REGISTRY
)
REQUEST_SECONDS = Histogram(
    "ditserve_request_seconds", "End-to-end request latency", ["endpoint", "model", "status"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "ditserve_stage_seconds", "Latency of one stage call (router: the whole batch)", ["stage"],
    buckets=_LATENCY_BUCKETS, registry=ROUTER_REGISTRY,
)
DENOISE_STEP_SECONDS = Histogram(
    "ditserve_denoise_step_seconds", "Mean time of one denoising step of a batch", buckets=_STEP_BUCKETS,
    registry=ROUTER_REGISTRY,
)
DENOISE_STEPS = Counter(
    "ditserve_denoise_steps", "Denoising steps run, by how they ran", ["kind"], registry=ROUTER_REGISTRY
)  # kind = computed | cached
PEAK_MEMORY_BYTES = Gauge(
    "ditserve_peak_memory_bytes", "Peak device memory of the last call of a stage, per rank", ["stage", "rank"],
    registry=ROUTER_REGISTRY,
)
REQUEST_PEAK_MEMORY_BYTES = Histogram(
    "ditserve_request_peak_memory_bytes", "Peak device memory of a stage call, over calls", ["stage", "rank"],
    buckets=_MEMORY_BUCKETS, registry=ROUTER_REGISTRY,
)
QUEUE_DEPTH = Gauge("ditserve_queue_depth", "Requests waiting for a batch", registry=ROUTER_REGISTRY)
BATCH_SIZE = Histogram(
    "ditserve_batch_size", "Images per denoiser batch", buckets=(1, 2, 4, 8, 16, 32), registry=ROUTER_REGISTRY
)
LORA_LOADS = Counter("ditserve_lora_loads", "LoRA adapter files read by denoiser replicas", registry=ROUTER_REGISTRY)
LORA_HITS = Counter("ditserve_lora_hits", "LoRA adapters found already loaded", registry=ROUTER_REGISTRY)


def observe_batch(stages: dict, batch_size: int, steps: int, cache_stats, batch_seconds: float) -> None:
    """Record one router batch: what each stage call cost (per rank), the denoising steps and
    how they ran, LoRA loads / hits, and the router's own wall time for the batch."""
    for stage, m in stages.items():
        STAGE_SECONDS.labels(stage).observe(m.seconds)
        for rank, peak in enumerate(m.peak_memory_by_rank or [m.peak_memory_bytes]):
            PEAK_MEMORY_BYTES.labels(stage, str(rank)).set(peak)
            REQUEST_PEAK_MEMORY_BYTES.labels(stage, str(rank)).observe(peak)
    STAGE_SECONDS.labels("router").observe(batch_seconds)
    BATCH_SIZE.observe(batch_size)
    denoiser = stages.get("denoiser")
    if denoiser is not None:
        DENOISE_STEP_SECONDS.observe(denoiser.seconds / max(steps, 1))
        LORA_LOADS.inc(denoiser.lora_loads)
        LORA_HITS.inc(denoiser.lora_hits)
    cached = cache_stats.cached_steps if cache_stats is not None else 0
    DENOISE_STEPS.labels("computed").inc(steps - cached)
    DENOISE_STEPS.labels("cached").inc(cached)


def exposition(router_text: str) -> bytes:
    """The gateway's GET /metrics: its own series, then the router's."""
    return generate_latest(REGISTRY) + router_text.encode()


def router_exposition() -> str:
    return generate_latest(ROUTER_REGISTRY).decode()
