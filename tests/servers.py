"""Start real `ditserve worker` / `ditserve serve` processes (tests, benchmarks) and wait until ready."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    def __init__(self, args: list[str], ready: str, timeout_s: float = 120, env: dict | None = None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.output: list[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited {self.proc.returncode}: {''.join(self.output)}{self.proc.stdout.read()}")
            r, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if r:
                line = self.proc.stdout.readline()
                self.output.append(line)
                if (m := re.search(ready, line)):
                    self.match = m
                    return
        self.kill()
        raise TimeoutError(f"{args[0]} not ready after {timeout_s}s: {''.join(self.output)}")

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
