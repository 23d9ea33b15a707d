from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import ray

from deployments.adapter_files import default_adapter_dir
from deployments.tiny_adapters import EMBEDDING_FILE, LORA_FILE, write_tiny_embedding, write_tiny_lora
from tests.integration.harness import ServeHarness, free_port
from tests.redis_server import redis_url  # noqa: F401 - a fixture
from tests.s3_server import s3_endpoint, service_env  # noqa: F401 - a fixture

TEST_API_KEYS_ENV = "SDXL_SERVE_TEST_API_KEYS"
TEST_API_KEY = "sk-test-4a1f9c2e7b"
OTHER_API_KEY = "sk-test-second-77d03b"  # a second client's key: it must never see the first one's jobs
TEST_REDIS_URL_ENV = "SDXL_SERVE_TEST_REDIS_URL"
FAULT_REDIS_URL_ENV = "SDXL_SERVE_FAULT_REDIS_URL"  # a Redis the fault tests kill, pause and flush


@pytest.fixture(scope="session")
def serve_harness(tmp_path_factory: pytest.TempPathFactory, redis_url: str, s3_endpoint: str):  # noqa: F811
    """One Ray instance and Serve proxy for the whole integration session."""
    # Set in the environment Ray's processes inherit, not in `runtime_env`: Ray logs runtime_env.
    os.environ["SDXL_SERVE_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    os.environ[TEST_API_KEYS_ENV] = f"{TEST_API_KEY},{OTHER_API_KEY}"
    os.environ[TEST_REDIS_URL_ENV] = redis_url  # only apps with `redis_url_env` set to it read it
    # Its port is chosen now (Ray's processes read the URL from the environment they start with); the
    # fault tests start that Redis themselves, with persistence, and kill it.
    os.environ[FAULT_REDIS_URL_ENV] = f"redis://127.0.0.1:{free_port()}/0"
    # The S3 endpoint apps with `queue.outputs_url: s3://...` store result images in (moto's server);
    # the others keep them in a directory under the model cache.
    os.environ.update(service_env(s3_endpoint))
    # Logical CPUs: more than the machine has, so several test apps can be resident at once.
    ray.init(
        num_cpus=16,
        include_dashboard=False,
        log_to_driver=False,  # replica logs: /tmp/ray/session_latest/logs/serve/
        _metrics_export_port=free_port(),  # tests read the custom metrics from here
    )
    harness = ServeHarness(free_port())
    yield harness
    ray.shutdown()  # takes Serve down with it, without waiting for each replica's graceful shutdown


@pytest.fixture(scope="session")
def local_url(serve_harness: ServeHarness) -> str:
    """The local default config (`configs/local.yaml`), deployed at `/`."""
    return serve_harness.deploy("sdxl", "/")


@pytest.fixture()
def client() -> httpx.Client:
    with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as http:
        yield http


@pytest.fixture(scope="session")
def tiny_adapters(serve_harness: ServeHarness) -> Path:
    """The README's tiny LoRA and embedding (`python -m deployments.tiny_adapters`), in the default adapter
    directory every test app's replicas read (`$SDXL_SERVE_CACHE/adapters`, set above)."""
    directory = default_adapter_dir()
    write_tiny_lora(directory / LORA_FILE)
    write_tiny_embedding(directory / EMBEDDING_FILE)
    return directory
