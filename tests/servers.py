"""Start real `ditserve worker` / `ditserve serve` processes (tests, benchmarks) and wait until ready."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    """A port free now, outside the kernel's ephemeral range (32768-60999 on Linux) and Ray's
    worker ports (10002-19999). A port the kernel hands out for bind(0) can be taken by one of
    Ray's own processes (they bind ephemeral ports as they start) between this pick and the
    server's bind: CI once saw Ray Serve's proxy fail to bind the HTTP port that way."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 32767)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


class Process:
    """A `ditserve` subprocess whose output a thread keeps draining (a full pipe would block the
    child's logging) while the constructor waits for the line matching `ready`."""

    def __init__(self, args: list[str], ready: str, timeout_s: float = 120, env: dict | None = None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.output: list[str] = []
        self.match = None
        ready_event = threading.Event()

        def drain():
            for line in self.proc.stdout:
                self.output.append(line)
                if self.match is None and (m := re.search(ready, line)):
                    self.match = m
                    ready_event.set()
            ready_event.set()  # EOF: the process ended

        threading.Thread(target=drain, daemon=True).start()
        if not ready_event.wait(timeout_s):
            self.kill()
            raise TimeoutError(f"{args[0]} not ready after {timeout_s}s: {''.join(self.output[-40:])}")
        if self.match is None:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"{args[0]} exited {self.proc.returncode}: {''.join(self.output[-40:])}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        """SIGTERM (graceful: a Ray server shuts its local cluster down), SIGKILL if that hangs."""
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill()


def start_worker(role: str, model_path, port: int = 0, extra=(), device: str = "cpu",
                 timeout_s: float = 120) -> tuple[Process, int]:
    p = Process(
        ["worker", "--role", role, "--model-path", str(model_path), "--grpc-port", str(port), "--device", device,
         *extra],
        ready=rf"worker {role} ready on [\d.]+:(\d+)",
        timeout_s=timeout_s,
    )
    return p, int(p.match.group(1))


def start_serve(model_path, *extra, ray: bool = False, timeout_s: float = 120,
                device: str = "cpu", env: dict | None = None) -> tuple[Process, int, int]:
    http, grpc_port = free_port(), free_port()
    p = Process(
        ["serve", "--model-path", str(model_path), "--port", str(http), "--grpc-port", str(grpc_port),
         *([] if ray else ["--no-ray"]), "--device", device, *extra],
        ready=r"ditserve serving.*",
        timeout_s=timeout_s,
        env=env,
    )
    return p, http, grpc_port


@contextlib.contextmanager
def disaggregated(model_path, *serve_args):
    """Encoder, denoiser and VAE as `ditserve worker` processes behind `ditserve serve --no-ray`;
    yields the REST base URL and the gRPC address."""
    workers = {role: start_worker(role, model_path) for role in ("encoder", "denoiser", "vae")}
    serve = None
    try:
        addresses = [f"--{role}-address=127.0.0.1:{port}" for role, (_, port) in workers.items()]
        serve, http_port, grpc_port = start_serve(model_path, *serve_args, *addresses)
        yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
    finally:
        for proc in [serve] + [p for p, _ in workers.values()]:
            if proc is not None:
                proc.kill()
