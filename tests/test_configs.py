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
KUBERAY = REPO / "configs" / "kuberay-rayservice.yaml"
CONFIGS = sorted([REPO / "serve_config.yaml", *(REPO / "configs").glob("*.yaml")])
CONFIGS.remove(KUBERAY)
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


def test_kuberay_service_runs_the_production_serve_config() -> None:
    manifest = yaml.safe_load(KUBERAY.read_text())
    assert manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load((REPO / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(serve_config)

    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas go to workers
    (workers,) = cluster["workerGroupSpecs"]
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Weights come from a shared volume that HF_HOME points into, offline.
    mounts = {mount["name"]: mount["mountPath"] for mount in worker["volumeMounts"]}
    env = {item["name"]: item.get("value") for item in worker["env"]}
    assert env["HF_HOME"].startswith(mounts["models"]) and env["HF_HUB_OFFLINE"] == "1"
    volumes = {volume["name"]: volume for volume in workers["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" in volumes["models"]
    assert workers["maxReplicas"] >= max(
        d["autoscaling_config"]["max_replicas"]
        for d in serve_config["applications"][0]["deployments"]
        if "autoscaling_config" in d
    )


def test_few_step_variant_is_configuration_only() -> None:
    turbo = yaml.safe_load((REPO / "configs" / "sdxl-turbo.yaml").read_text())["applications"][0]
    base = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]
    assert turbo["import_path"] == base["import_path"]
    config = AppConfig.model_validate(turbo["args"])
    assert config.scheduler == "EulerAncestralDiscreteScheduler"
    assert config.request_defaults["num_inference_steps"] <= 4 and config.request_defaults["guidance_scale"] == 0
