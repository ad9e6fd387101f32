"""charts/ditserve: lints, renders, and what it renders is what Kubernetes, KubeRay and ditserve
accept. No cluster: the RayService is checked against KubeRay's CRD schema (../shared/kuberay),
core kinds against kubernetes-validate's bundled schemas, and the Ray Serve config and worker
flags go through ditserve's own parsers (the same path as `ditserve serve --config`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.cli import _denoiser_options, _from_ray_serve_config, build_parser, serve_config_from_args
from services.runtime.config import DenoiserConfig, DenoiserOptions, ServeConfig
from tests.helm import helm_binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ditserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERAY_CRD = REPO.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "img", "gen"
FULLNAME = "img-ditserve"

VALUE_SETS = [None, *CI_VALUES]  # None: the chart's defaults
VALUE_IDS = ["default", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]


def _unavailable(reason: str):
    if os.environ.get("DITSERVE_REQUIRE_HELM"):
        pytest.fail(f"{reason} (DITSERVE_REQUIRE_HELM is set)")
    pytest.skip(f"{reason}; set DITSERVE_REQUIRE_HELM=1 to fail instead")


@cache
def _helm() -> Path | None:
    return helm_binary()


def helm(*args: str) -> subprocess.CompletedProcess:
    path = _helm()
    if path is None:
        _unavailable("helm not on PATH and not installable (tests/helm.py)")
    return subprocess.run([str(path), *args], check=False, capture_output=True, text=True, timeout=60)


@cache
def render(values: Path | None = None) -> tuple[dict, ...]:
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", KUBE_VERSION]
    out = helm(*args, *(["-f", str(values)] if values else []))
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def standalone(values: Path | None) -> bool:
    return values is not None and yaml.safe_load(values.read_text()).get("mode") == "standalone"


def one(docs, kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def containers(docs) -> dict[str, dict]:
    """Deployment name -> its (only) container."""
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0] for d in deployments}


# --- lint and schema validation of every rendered object --------------------------------


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_helm_lint_strict(values):
    out = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert out.returncode == 0, out.stdout + out.stderr


@cache
def _rayservice_validator() -> jsonschema.Draft7Validator:
    if not KUBERAY_CRD.is_file():
        _unavailable(f"KubeRay CRD not found at {KUBERAY_CRD}")
    crd = yaml.load(KUBERAY_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))


def _closed(schema):
    """The API server prunes fields a structural schema does not declare; here they are errors,
    so a misspelt or misplaced key fails the test instead of vanishing on `kubectl apply`."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _closed(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            out[key] = _closed(value)
        else:
            out[key] = value
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _check_monitor(doc: dict, endpoints_key: str) -> None:
    """No CRD for prometheus-operator here: the fields it requires, by hand."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["spec"]["selector"]["matchLabels"] and doc["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = doc["spec"][endpoints_key]
    assert endpoint["path"] == "/metrics" and endpoint["port"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_every_rendered_object_is_valid_for_its_api(values):
    kinds = set()
    for doc in render(values):
        kinds.add(doc["kind"])
        if doc["kind"] == "RayService":
            errors = sorted(_rayservice_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
            assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])
        elif doc["kind"] == "ServiceMonitor":
            _check_monitor(doc, "endpoints")
        elif doc["kind"] == "PodMonitor":
            _check_monitor(doc, "podMetricsEndpoints")
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    expected = {"Deployment", "ConfigMap", "Service"} if standalone(values) else {"RayService", "Service"}
    assert expected <= kinds


@pytest.mark.parametrize("bad, where", [
    ("serve.denoiser.num_replicas=-1", "serve.denoiser.num_replicas"),  # ServeConfig's own bound
    ("serve.router.max_batch_size=four", "serve.router.max_batch_size"),
    ("serve.denoiser.ulysses=2", "ulysses"),  # not a ServeConfig field
    ("serve.port=8001", "port"),  # the chart's to set (ports.http)
    ("ray.head.rayStartParams.num-gpus=0", "num-gpus"),  # KubeRay wants strings
    ("mode=ray", "mode"),
])
def test_values_schema_rejects_bad_values(bad, where):
    out = helm("template", RELEASE, str(CHART), "--set", bad)
    assert out.returncode != 0 and "schema" in out.stderr and where in out.stderr, out.stderr


@pytest.mark.parametrize("sets, message", [
    (("serve.denoiser.ulysses_degree=2",), "serve.denoiser needs 2 GPUs per replica"),
    (("serve.encoder.tp_size=2",), "serve.encoder needs 2 GPUs per replica"),
    (("volumes.model.claimName=weights",), "set serve.model_path"),
    (("volumes.lora.hostPath=/l", "volumes.lora.claimName=l", "serve.denoiser.lora_dir=/l"), "not both"),
    (("mode=standalone", "volumes.videoJobs.claimName=v", "serve.video_jobs_path=/v/jobs.db",
      "standalone.gateway.replicas=2"), "one gateway replica owns the video job database"),
    (("serve.video_jobs_path=jobs.db",), "serve.video_jobs_path must be an absolute path"),
])
def test_chart_refuses_what_cannot_run(sets, message):
    out = helm("template", RELEASE, str(CHART), *(a for s in sets for a in ("--set", s)))
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_serve_part_of_values_schema_is_generated_from_serve_config():
    spec = importlib.util.spec_from_file_location("values_schema", CHART / "values_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (CHART / "values.schema.json").read_text()
    assert module.render(module.with_serve_defs(json.loads(current))) == current, (
        "values.schema.json is stale: run python charts/ditserve/values_schema.py")


# --- one source: the chart's Ray Serve config is deploy/serve.yaml ------------------------


def test_default_serve_config_is_deploy_serve_yaml():
    rendered = yaml.safe_load(one(render(), "RayService")["spec"]["serveConfigV2"])
    assert rendered == yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text()), (
        "the chart's default `serve` values and deploy/serve.yaml differ: change both together")


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_rendered_serve_config_is_a_ditserve_serve_config(values):
    docs = render(values)
    if standalone(values):
        text = one(docs, "ConfigMap", f"{FULLNAME}-serve")["data"]["serve.yaml"]
    else:
        text = one(docs, "RayService")["spec"]["serveConfigV2"]
    raw = yaml.safe_load(text)
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(raw)
    config = ServeConfig(**_from_ray_serve_config(raw))  # what `ditserve serve --config` does
    assert (config.host, config.port, config.grpc_port) == ("0.0.0.0", 8000, 9000)


def test_multi_gpu_values_give_each_denoiser_replica_two_gpus_on_one_node():
    raw = yaml.safe_load(one(render(CHART / "ci" / "multi-gpu-values.yaml"), "RayService")["spec"]["serveConfigV2"])
    denoiser = ServeConfig(**_from_ray_serve_config(raw)).denoiser
    opts = denoiser.ray_options()
    assert denoiser.world_size == 2 and opts["placement_group_strategy"] == "STRICT_PACK"
    assert sum(b.get("GPU", 0) for b in opts["placement_group_bundles"]) == 2


# --- Ray mode: head, GPU workers, the stable Service ---------------------------------------


def test_rayservice_head_workers_and_service():
    docs = render()
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == 8000 and ports["grpc"] == 9000  # KubeRay's serve Service needs "serve"
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    service = one(docs, "Service", FULLNAME)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 9000}
    selector = dict(service["spec"]["selector"])
    assert selector.pop("ray.io/serve") == "true"  # set by KubeRay on heads with a healthy proxy
    assert selector.items() <= head["template"]["metadata"]["labels"].items()


def test_monitors_scrape_the_gateway_metrics_port():
    docs = render(CHART / "ci" / "monitoring-values.yaml")
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service", FULLNAME)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    head = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= head["metadata"]["labels"].items()
    head_ports = {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in head_ports
    assert not [d for d in render() if d["kind"] in ("ServiceMonitor", "PodMonitor")]  # off by default


def test_dashboards_configmap_holds_every_dashboard_file():
    dashboards = one(render(), "ConfigMap", f"{FULLNAME}-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert sorted(dashboards.get("data") or {}) == [f.name for f in files]
    for f in files:
        assert json.loads(dashboards["data"][f.name]) == json.loads(f.read_text())


# --- standalone mode: the gateway and workers parse their own arguments --------------------


def test_standalone_gateway_and_workers_are_wired(tmp_path):
    values = CHART / "ci" / "standalone-values.yaml"
    docs, chart_values = render(values), yaml.safe_load(values.read_text())
    deployments = containers(docs)
    gateway = deployments.pop(f"{FULLNAME}-gateway")
    assert gateway["command"] == ["ditserve"] and gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(one(docs, "ConfigMap", f"{FULLNAME}-serve")["data"]["serve.yaml"])
    args = [a if a != "/etc/ditserve/serve.yaml" else str(config_file) for a in gateway["args"]]
    config = serve_config_from_args(build_parser().parse_args(args))
    assert not config.ray and config.served_model_name == "flux-dev"
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for stage in ("encoder", "denoiser", "vae"):
        host, port = getattr(config, stage).address.split(":")
        assert host == f"{FULLNAME}-{stage}" and int(port) == services[host]["spec"]["ports"][0]["port"]
        worker = deployments.pop(host)
        parsed = build_parser().parse_args(worker["args"])
        assert (parsed.role, parsed.host, parsed.grpc_port) == (stage, "0.0.0.0", int(port))
        assert worker["readinessProbe"]["grpc"]["port"] == int(port)
        mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        assert mounts[chart_values["serve"]["model_path"]] == "model"
        gpus = worker["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
        assert gpus == {"encoder": 1, "denoiser": 1, "vae": 0}[stage]  # vae: gpus 0 in the values
    assert not deployments
    denoiser_mounts = {m["name"]: m["mountPath"] for m in containers(docs)[f"{FULLNAME}-denoiser"]["volumeMounts"]}
    assert denoiser_mounts["compile-cache"] == str(config.denoiser.compile_cache_dir)
    assert denoiser_mounts["lora"] == str(config.denoiser.lora_dir)
    assert one(docs, "Service", FULLNAME)["spec"]["selector"]["app.kubernetes.io/component"] == "gateway"


EVERY_DENOISER_OPTION = {  # a non-default value of each DenoiserOptions field
    "ulysses_degree": 2, "ring_degree": 2, "tp_size": 2, "cfg_parallel": True, "precision": "fp8",
    "attention_precision": "fp8", "compile": False, "cuda_graphs": False, "ulysses_exchange": "copy-engine", "compile_cache_dir": "/cache", "warmup_resolutions": ["1024x1024", "512x768"],
    "lora_dir": "/loras", "max_loras": 3, "layerwise_offload": True, "offload_prefetch": 2,
}


def test_standalone_denoiser_flags_carry_every_denoiser_option(tmp_path):
    assert set(EVERY_DENOISER_OPTION) == set(DenoiserOptions.model_fields), (
        "new DenoiserOptions field: give it a flag in ditserve.workerArgs (templates/_helpers.tpl), then add it here")
    values = tmp_path / "values.yaml"
    denoiser = {"num_gpus": 1, **EVERY_DENOISER_OPTION}
    values.write_text(yaml.safe_dump({"mode": "standalone", "serve": {"denoiser": denoiser}}))
    worker = containers(render(values))[f"{FULLNAME}-denoiser"]
    parsed = build_parser().parse_args(worker["args"])
    options = DenoiserConfig(**_denoiser_options(parsed)).options()
    assert options == ServeConfig(denoiser=EVERY_DENOISER_OPTION).denoiser.options()
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 16  # one GPU per rank: 2 x 2 x 2 x 2


def test_standalone_encoder_worker_gets_its_tp_size_and_one_gpu_per_rank(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"mode": "standalone", "serve": {"encoder": {"num_gpus": 1, "tp_size": 2}}}))
    worker = containers(render(values))[f"{FULLNAME}-encoder"]
    parsed = build_parser().parse_args(worker["args"])
    assert (parsed.role, parsed.tp_size) == ("encoder", 2)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_standalone_diffusers_backend_runs_only_the_denoiser_and_keeps_video_jobs(tmp_path):
    values = CHART / "ci" / "diffusers-video-values.yaml"
    docs = render(values)
    deployments = containers(docs)
    assert set(deployments) == {f"{FULLNAME}-gateway", f"{FULLNAME}-denoiser"}
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(one(docs, "ConfigMap", f"{FULLNAME}-serve")["data"]["serve.yaml"])
    gateway = deployments[f"{FULLNAME}-gateway"]
    args = [a if a != "/etc/ditserve/serve.yaml" else str(config_file) for a in gateway["args"]]
    config = serve_config_from_args(build_parser().parse_args(args))
    assert config.backend == "diffusers" and config.encoder.address is None and config.vae.address is None
    assert config.denoiser.address.startswith(f"{FULLNAME}-denoiser:")
    mounts = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    assert mounts["video-jobs"] == str(config.video_jobs_file().parent)
    worker = build_parser().parse_args(deployments[f"{FULLNAME}-denoiser"]["args"])
    assert (worker.role, worker.backend) == ("denoiser", "diffusers")


def test_standalone_vae_worker_warms_up_the_serve_config_sizes():
    docs = render(CHART / "ci" / "standalone-values.yaml")
    vae = build_parser().parse_args(containers(docs)[f"{FULLNAME}-vae"]["args"])
    assert vae.warmup_resolutions == ["1024x1024", "768x1344"]
