"""`ditserve serve --ray-address`: join a running Ray cluster, and on exit remove only our application."""

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.servers import free_port, start_serve

RAY = str(Path(sys.executable).parent / "ray")


def test_serve_joins_an_existing_cluster_and_leaves_it_running(flux_dev_dir):
    port = free_port()
    head = subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                           "--disable-usage-stats"], capture_output=True, text=True, timeout=120)
    assert head.returncode == 0, head.stderr
    try:
        # `ray start` enables Ray's token auth (the token lands in ~/.ray/auth_token); a client
        # that names an address must be told to use it, as on any token-auth cluster.
        serve, http_port, _ = start_serve(flux_dev_dir, "--ray-address", f"127.0.0.1:{port}", ray=True, timeout_s=180,
                                          env={"RAY_AUTH_MODE": "token"})
        try:
            r = httpx.post(f"http://127.0.0.1:{http_port}/v1/images/generations", timeout=60,
                           json={"prompt": "x", "size": "32x32", "num_inference_steps": 1})
            assert r.status_code == 200
        finally:
            serve.stop()
        status = subprocess.run([RAY, "status", f"--address=127.0.0.1:{port}"], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "RAY_AUTH_MODE": "token"})
        assert status.returncode == 0, "the cluster we joined must outlive `ditserve serve`"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
