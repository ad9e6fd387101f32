"""What every ditserve gRPC server shares: message limits, health, reflection, error mapping."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime.codec import GRPC_OPTIONS, keepalive_options
from services.runtime.errors import GRPC_STATUS, DitserveError, lookup

log = logging.getLogger(__name__)

ERROR_CODE_KEY = "ditserve-error-code"


def status_for(exc: DitserveError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, lookup(GRPC_STATUS, exc, "INTERNAL"))


def abort_with(context: grpc.ServicerContext, exc: Exception):
    """End the call with the status that matches `exc`; the typed code rides in trailing metadata."""
    if isinstance(exc, DitserveError):
        context.set_trailing_metadata(((ERROR_CODE_KEY, exc.code),))
        context.abort(status_for(exc), str(exc))
    log.exception("stage call failed")
    context.set_trailing_metadata(((ERROR_CODE_KEY, "internal_error"),))
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def start_server(
    add_fns: list, service_names: list[str], host: str, port: int, max_workers: int = 16
) -> tuple[grpc.Server, int]:
    """Start a threaded server with health (SERVING for each service) and reflection.
    Returns the server and the bound port (port 0 picks a free one)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=GRPC_OPTIONS + keepalive_options())
    for add in add_fns:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    server.start()
    return server, bound


class SerializedStage:
    """Runs a stage's calls one at a time (one device, one model copy) and maps errors.

    Callers queue on the lock; a caller whose client went away while it waited is dropped
    without touching the device."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()

    def call(self, context: grpc.ServicerContext, fn, *args):
        from services.runtime.errors import RequestCancelledError

        try:
            with self._lock:
                if not context.is_active():
                    raise RequestCancelledError("client went away before the stage started")
                return fn(*args)
        except Exception as exc:
            abort_with(context, exc)
