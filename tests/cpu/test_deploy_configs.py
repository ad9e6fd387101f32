"""deploy/: the Ray Serve config is valid for Ray and its args are ditserve's ServeConfig; the
standalone config is the same schema."""

from pathlib import Path

import pytest
import yaml

from services.runtime.config import ServeConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_ray_serve_config_is_accepted_by_ray_and_builds_the_application():
    from ray.serve.schema import ServeDeploySchema

    from services.ray_app import GRPC_SERVICER_FUNCTIONS, app_builder

    raw = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "services.ray_app:app_builder"
    assert raw["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICER_FUNCTIONS
    config = ServeConfig(**app.args)
    assert config.ray and config.denoiser.autoscaling.max_replicas == 4 and config.encoder.num_gpus == 1
    application = app_builder(app.args)  # builds the deployment graph without starting Ray
    assert type(application).__name__ == "Application"


def test_standalone_config_is_the_same_schema():
    config = ServeConfig(**yaml.safe_load((DEPLOY / "standalone.yaml").read_text()))
    assert not config.ray
    assert [getattr(config, r).address for r in ("encoder", "denoiser", "vae")] == [
        "127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"]


def test_stage_addresses_under_ray_are_refused():
    with pytest.raises(ValueError, match="ray: false"):
        ServeConfig(encoder={"address": "h:1"})


def test_serve_flags_override_the_config_file(tmp_path, capsys):
    from services.cli import EXIT_BAD_INPUT, main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("router:\n  max_batch_size: 0\n")
    assert main(["serve", "--config", str(cfg), "--no-ray"]) == EXIT_BAD_INPUT
    assert "router.max_batch_size" in capsys.readouterr().err
    cfg.write_text("not_a_field: 1\n")
    assert main(["serve", "--config", str(cfg)]) == EXIT_BAD_INPUT
    assert "not_a_field" in capsys.readouterr().err


def test_ditserve_serve_reads_a_ray_serve_config(tmp_path):
    from services.cli import build_parser, serve_config_from_args

    args = build_parser().parse_args(["serve", "--config", str(DEPLOY / "serve.yaml"), "--host", "127.0.0.1"])
    config = serve_config_from_args(args)
    assert (config.host, config.port, config.grpc_port) == ("127.0.0.1", 8000, 9000)
    assert config.denoiser.autoscaling.max_replicas == 4
