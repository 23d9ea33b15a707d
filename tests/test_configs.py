"""Every shipped Serve config is valid for Ray Serve and for our app, and names real deployments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.sdxl import SDXLDeployment
from serve_app.config import AppConfig
from serve_app.ingress import SDXLIngress

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted([REPO / "serve_config.yaml", *(REPO / "configs").glob("*.yaml")])
DEPLOYMENT_NAMES = {SDXLIngress.name, SDXLDeployment.name}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_is_valid(path: Path) -> None:
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for app in schema.applications:
        assert app.import_path == "serve_app.app:build_app"
        AppConfig.model_validate(app.args)  # extra="forbid": a misspelt knob fails here
        assert {deployment.name for deployment in app.deployments} <= DEPLOYMENT_NAMES


def test_production_config_uses_gpus_and_real_models() -> None:
    app = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]
    config = AppConfig.model_validate(app["args"])
    assert config.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.preview_decoder == "madebyollin/taesdxl"
    sdxl = next(d for d in app["deployments"] if d["name"] == "SDXLDeployment")
    assert sdxl["ray_actor_options"]["num_gpus"] == 1
    assert sdxl["max_ongoing_requests"] == 1
    assert "autoscaling_config" in sdxl


def test_local_config_is_the_offline_cpu_default() -> None:
    config = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    args = AppConfig.model_validate(config["applications"][0]["args"])
    assert (args.model, args.device) == ("tiny", "cpu")
