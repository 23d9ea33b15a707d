"""Every shipped Serve config is valid for Ray Serve and for our app, and names real deployments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.sdxl import SDXLDeployment
from serve_app.config import AppConfig
from serve_app.contract.requests import GenerationRequest
from serve_app.http.ingress import SDXLIngress
from serve_app.queue.job_queue import JobQueue

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "configs" / "kuberay-rayservice.yaml"
CONFIGS = sorted([REPO / "serve_config.yaml", *(REPO / "configs").glob("*.yaml")])
CONFIGS.remove(KUBERAY)
DEPLOYMENT_NAMES = {SDXLIngress.name, JobQueue.name, SDXLDeployment.name}


def kuberay_documents() -> dict[str, dict]:
    """The manifest's documents by `kind/name`."""
    documents = yaml.safe_load_all(KUBERAY.read_text())
    return {f"{document['kind']}/{document['metadata']['name']}": document for document in documents}


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
    assert config.model.source == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.previews.decoder == "madebyollin/taesdxl"
    sdxl = next(d for d in app["deployments"] if d["name"] == "SDXLDeployment")
    assert sdxl["ray_actor_options"]["num_gpus"] == 1
    assert sdxl["max_ongoing_requests"] == 1
    assert "autoscaling_config" in sdxl


def test_local_config_is_the_offline_cpu_default() -> None:
    config = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    args = AppConfig.model_validate(config["applications"][0]["args"])
    assert (args.model.source, args.model.device) == ("tiny", "cpu")


def test_kuberay_service_runs_the_production_serve_config() -> None:
    manifest = kuberay_documents()["RayService/sdxl-serve"]
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
    assert config.model.scheduler == "EulerAncestralDiscreteScheduler"
    defaults = config.requests.defaults
    assert defaults["num_inference_steps"] <= 4 and defaults["guidance_scale"] == 0


FP16_SAFE_VAES = {"madebyollin/sdxl-vae-fp16-fix"}  # config `force_upcast: false`: decodes in float16


def serve_configs() -> dict[str, dict]:
    """Every shipped Serve config by name, the one inside the KubeRay manifest included."""
    configs = {path.name: yaml.safe_load(path.read_text()) for path in CONFIGS}
    configs[KUBERAY.name] = yaml.safe_load(kuberay_documents()["RayService/sdxl-serve"]["spec"]["serveConfigV2"])
    return configs


def cuda_apps() -> list[tuple[str, dict]]:
    return [
        (f"{name}:{app['name']}", app)
        for name, config in serve_configs().items()
        for app in config["applications"]
        if AppConfig.model_validate(app["args"]).model.device == "cuda"
    ]


@pytest.mark.parametrize(("name", "app"), cuda_apps(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_cuda_config_is_set_up_for_the_gpu(name: str, app: dict) -> None:
    """A GPU for the SDXL replica (without `num_gpus` Ray hides it, or does not account for it); in
    float16 a VAE that decodes in float16 (SDXL's own upcasts to float32 for every image); a warm-up
    at the shape its requests default to."""
    config = AppConfig.model_validate(app["args"])
    sdxl = next(d for d in app["deployments"] if d["name"] == SDXLDeployment.name)
    assert sdxl["ray_actor_options"]["num_gpus"] >= 1
    if config.model.dtype in ("float16", "auto"):
        assert config.model.vae in FP16_SAFE_VAES, f"{name}: float16 on CUDA without an fp16-safe `vae`"
    defaults = config.request_policy().resolve(GenerationRequest(prompt="check"))
    assert (defaults.width, defaults.height) in config.model.warmup_image_sizes()


def test_there_are_cuda_configs_to_check() -> None:
    assert {name.split(":")[0] for name, _ in cuda_apps()} >= {
        "serve_config.yaml",
        "sdxl-turbo.yaml",
        "kuberay-rayservice.yaml",
    }


def test_overhead_benchmark_gives_its_gpu_replicas_a_gpu() -> None:
    """The harness replaces a deployment's `ray_actor_options` rather than merging: the benchmark
    passes them whole, local.yaml's plus `num_gpus` on CUDA."""
    from benchmarks.overhead import sdxl_actor_options

    local = yaml.safe_load((REPO / "configs/local.yaml").read_text())["applications"][0]["deployments"]
    local_options = next(d for d in local if d["name"] == SDXLDeployment.name)["ray_actor_options"]
    assert sdxl_actor_options("cuda") == {**local_options, "num_gpus": 1}
    assert sdxl_actor_options("cpu") == local_options
    assert sdxl_actor_options("cuda", num_cpus=1) == {"num_cpus": 1, "num_gpus": 1}


def test_the_production_job_store_is_redis_with_its_url_from_a_secret() -> None:
    documents = kuberay_documents()
    service = documents["RayService/sdxl-serve"]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    config = AppConfig.model_validate(args)
    assert config.queue.store == "redis"
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    env = {item["name"]: item for item in workers["template"]["spec"]["containers"][0]["env"]}
    assert env[config.queue.redis_url_env]["valueFrom"]["secretKeyRef"]["name"] == "sdxl-serve-redis"
    redis = documents["StatefulSet/sdxl-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly" in redis["args"] and "Service/sdxl-redis" in documents
    # Redis refuses writes at its bound (the queue answers 503) instead of being OOM-killed at the pod's.
    args = dict(zip(redis["args"][::2], redis["args"][1::2], strict=True))
    assert args["--maxmemory-policy"] == "noeviction" and args["--appendfsync"] == "always"
    assert int(args["--maxmemory"].removesuffix("mb")) * 1024**2 < 2 * 1024**3  # the container's 2Gi limit


def test_production_runs_two_job_queue_replicas_that_hand_jobs_back_before_serve_kills_them() -> None:
    app = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]
    job_queue = next(d for d in app["deployments"] if d["name"] == JobQueue.name)
    config = AppConfig.model_validate(app["args"])
    assert job_queue["num_replicas"] == 2 and config.queue.store == "redis"
    assert config.queue.shutdown_handoff_s < job_queue["graceful_shutdown_timeout_s"]


def test_the_front_proxy_is_the_public_entry_and_every_serve_proxy_runs_the_edge_checks() -> None:
    documents = kuberay_documents()
    assert documents["Service/sdxl-edge"]["spec"]["type"] == "LoadBalancer"
    nginx = documents["ConfigMap/sdxl-edge-nginx"]["data"]["nginx.conf"]
    assert "server sdxl-serve-serve-svc:8000;" in nginx and "client_header_timeout" in nginx
    cluster = documents["RayService/sdxl-serve"]["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {item["name"]: item.get("value") for item in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serve_app.http.edge:proxy_middlewares"


def test_the_front_proxy_sends_polls_to_the_status_port_and_kubernetes_runs_the_same_nginx_config() -> None:
    documents = kuberay_documents()
    kubernetes = documents["ConfigMap/sdxl-edge-nginx"]["data"]["nginx.conf"].splitlines()
    local = (REPO / "configs" / "nginx-front-proxy.conf").read_text().splitlines()
    # The same config but for where the upstreams are and the public name.
    differing = {
        line.strip() for line in [*set(local) ^ set(kubernetes)] if line.strip() and not line.strip().startswith("#")
    }
    assert differing == {
        "server 127.0.0.1:8000;",
        "server 127.0.0.1:8001 max_fails=1 fail_timeout=5s;",
        "server 127.0.0.1:8000 backup;",
        "localhost 1;",
        "127.0.0.1 1;",
        "server sdxl-serve-serve-svc:8000;",
        "resolver kube-dns.kube-system.svc.cluster.local valid=10s;",
        "zone sdxl_status 64k;",
        "server sdxl-serve-status.default.svc.cluster.local:8001 resolve max_fails=1 fail_timeout=5s;",
        "server sdxl-serve-serve-svc:8000 backup;",
        "sdxl.example.com 1;  # your public name(s)",
    }
    local_args = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())["applications"][0]["args"]
    production = AppConfig.model_validate(
        yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    )
    assert local_args["status_server"]["port"] == production.status_server.port == 8001
    assert production.status_server.host == "0.0.0.0"  # nginx runs in its own pods
    (port,) = documents["Service/sdxl-serve-status"]["spec"]["ports"]
    assert port["port"] == port["targetPort"] == production.status_server.port
    assert documents["Service/sdxl-serve-status"]["spec"]["clusterIP"] == "None"  # pod addresses, for nginx
    policy = documents["NetworkPolicy/sdxl-serve-only-from-edge"]["spec"]["ingress"][0]
    assert {rule["port"] for rule in policy["ports"]} == {8000, production.status_server.port}
