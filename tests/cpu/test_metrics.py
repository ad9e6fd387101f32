"""Prometheus metrics: one scrape of the gateway has every series, per-stage and per-rank peak
memory included, whatever process measured it."""

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.cli import build_in_process_router
from services.runtime import metrics
from services.runtime.config import GenerateRequest, StageConfig
from tests.servers import disaggregated


def samples(text: str) -> dict[tuple, float]:
    """name + sorted labels -> value; parsing fails on a malformed or duplicated exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def value(all_samples, name, **labels):
    return all_samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(scope="module")
def server(flux_dev_dir):
    with disaggregated(flux_dev_dir) as urls:
        yield urls["http"]


def test_one_scrape_has_every_series(server):
    body = dict(prompt="a red circle", size="32x32", num_inference_steps=12, seed=1)
    assert httpx.post(server + "/v1/images/generations", json=body, timeout=120).status_code == 200
    cached = httpx.post(server + "/v1/images/generations", json={**body, "cache": {"preset": "fast"}}, timeout=120)
    assert cached.status_code == 200
    got = samples(httpx.get(server + "/metrics").text)
    for stage in ("encoder", "denoiser", "vae"):  # measured in three other processes
        assert value(got, "ditserve_peak_memory_bytes", stage=stage, rank="0") > 2**20
        assert value(got, "ditserve_request_peak_memory_bytes_count", stage=stage, rank="0") == 2
        assert value(got, "ditserve_stage_seconds_count", stage=stage) == 2
    assert value(got, "ditserve_stage_seconds_count", stage="router") == 2
    assert value(got, "ditserve_requests_total", endpoint="images.generations", model="model", status="ok") == 2
    steps = cached.json()["cache_stats"]
    assert value(got, "ditserve_denoise_steps_total", kind="cached") == steps["cached_steps"]
    assert value(got, "ditserve_denoise_steps_total", kind="computed") == 12 + steps["computed_steps"]
    assert value(got, "ditserve_denoise_step_seconds_count") == 2
    assert value(got, "ditserve_batch_size_count") == 2 and value(got, "ditserve_queue_depth") == 0
    assert value(got, "ditserve_lora_loads_total") == 0


def test_every_rank_of_a_parallel_denoiser_reports_its_peak(flux_dev_dir):
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"),
                                     denoiser_options=dict(ulysses_degree=2))
    try:
        result = asyncio.run(router.generate(GenerateRequest(prompt="x", height=32, width=32, num_inference_steps=2)))
        peaks = result.stages["denoiser"].peak_memory_by_rank
        assert len(peaks) == 2 and all(p > 2**20 for p in peaks)
        got = samples(metrics.router_exposition())
        assert [value(got, "ditserve_peak_memory_bytes", stage="denoiser", rank=r) for r in "01"] == peaks
    finally:
        router.denoiser.stage.close()


def test_prometheus_scrapes_per_stage_peak_memory(server, tmp_path):
    """A real Prometheus server (Debian's `prometheus`) scrapes the gateway; per-stage peak
    memory comes back through its HTTP API."""
    import os
    import shutil
    import subprocess
    import time

    from tests.servers import free_port

    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("DITSERVE_REQUIRE_PROMETHEUS"):
            pytest.fail("prometheus is not installed (CI installs the Debian package in .ci/run)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    target = server.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: ditserve\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = dict(prompt="a blue square", size="32x32", num_inference_steps=2, seed=2)
        assert httpx.post(server + "/v1/images/generations", json=body, timeout=120).status_code == 200
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline and len(result) < 3:
            time.sleep(1)
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                  params={"query": 'ditserve_peak_memory_bytes{job="ditserve"}'}, timeout=5)
                result = reply.json()["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                continue
        stages = {r["metric"]["stage"]: float(r["value"][1]) for r in result}
        assert set(stages) >= {"encoder", "denoiser", "vae"} and min(stages.values()) > 2**20, result
    finally:
        proc.terminate()
        proc.wait(timeout=30)
