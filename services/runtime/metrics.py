"""Prometheus metrics (base units, `ditserve_` prefix) shared by the gateway and router.

One registry per process; the gateway serves it at GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300)

REQUESTS = Counter(
    "ditserve_requests", "Requests handled", ["endpoint", "model", "status"], registry=REGISTRY
)
REQUEST_SECONDS = Histogram(
    "ditserve_request_seconds", "End-to-end request latency", ["endpoint", "model", "status"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "ditserve_stage_seconds", "Per-stage latency of one stage call", ["stage"], buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
PEAK_MEMORY_BYTES = Gauge(
    "ditserve_peak_memory_bytes", "Peak device memory of the last call of a stage", ["stage", "rank"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("ditserve_queue_depth", "Requests waiting for a batch", registry=REGISTRY)
BATCH_SIZE = Histogram(
    "ditserve_batch_size", "Images per denoiser batch", buckets=(1, 2, 4, 8, 16, 32), registry=REGISTRY
)


def observe_result(result) -> None:
    """Record the per-stage numbers a GenerateResult carries."""
    for stage, m in result.stages.items():
        STAGE_SECONDS.labels(stage).observe(m.seconds)
        PEAK_MEMORY_BYTES.labels(stage, "0").set(m.peak_memory_bytes)
    BATCH_SIZE.observe(result.batch_size)
