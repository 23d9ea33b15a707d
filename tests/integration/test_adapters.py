"""LoRAs on the real stack: two model replicas, Serve's model multiplexing by adapter set. A repeated adapter
set lands on the replica that loaded it (one load, however many requests), each replica evicts its least
recently used LoRA, and a refused adapter is a 422 on every mode."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from ray import serve

from tests.integration.harness import ServeHarness

SMALL = {"prompt": "a red fox", "width": 128, "height": 128, "num_inference_steps": 2, "seed": 5}
APP = "adapters-two"
# A replica registers an adapter set with Serve's controller when it first serves it; the routers learn of it
# within a push interval (0.1 s) and a long poll. Requests sent before then may land on another replica.
ROUTING_PROPAGATION_S = 3.0


@pytest.fixture(scope="module")
def two_replicas(serve_harness: ServeHarness, tiny_adapters: Path):
    for seed in range(3):
        (tiny_adapters / f"extra-{seed}.safetensors").write_bytes(
            (tiny_adapters / "tiny-style.safetensors").read_bytes()
        )
    url = serve_harness.deploy(
        APP,
        "/adapters-two",
        args={"adapters": {"cache_max_count": 1}, "status_server": {"port": None}},
        deployments={"SDXLDeployment": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}}},
    )
    yield url
    serve_harness.remove(APP)


def replica_stats(replicas: int = 2, timeout_s: float = 60) -> dict[int, dict]:
    """Each model replica's counters, by process id: asked until every replica has answered."""
    handle = serve.get_deployment_handle("SDXLDeployment", APP)
    found: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    with ThreadPoolExecutor(1) as thread:
        while len(found) < replicas and time.monotonic() < deadline:
            stats = thread.submit(handle.stats.remote().result, timeout_s=timeout_s).result()
            found[stats["pid"]] = stats
    assert len(found) == replicas
    return found


def lora_loads() -> list[int]:
    return sorted(stats["adapters"]["lora_loads"] for stats in replica_stats().values())


def test_a_repeated_adapter_set_goes_to_the_replica_that_loaded_it(two_replicas: str, client: httpx.Client) -> None:
    """Six requests for one LoRA, one after another: one load in all. Without affinity each lands on either
    replica (Serve's power of two choices), so both would load it in 31 runs of 32."""
    for index in range(6):
        response = client.post(f"{two_replicas}/", json={**SMALL, "loras": [{"path": "tiny-style.safetensors"}]})
        assert response.status_code == 200, response.text
        if index == 0:
            time.sleep(ROUTING_PROPAGATION_S)
    assert lora_loads() == [0, 1]
    holders = [stats for stats in replica_stats().values() if stats["adapters"]["loras_loaded"]]
    assert [stats["adapters"]["loras_loaded"] for stats in holders] == [["tiny-style.safetensors"]]


def test_each_replica_evicts_its_least_recently_used_lora(two_replicas: str, client: httpx.Client) -> None:
    """`cache_max_count: 1`: four new LoRAs over two replicas evict at least two, and no replica holds more."""
    before = sum(stats["adapters"]["lora_evictions"] for stats in replica_stats().values())
    for seed in range(3):
        body = {**SMALL, "loras": [{"path": f"extra-{seed}.safetensors"}]}
        assert client.post(f"{two_replicas}/", json=body).status_code == 200
    stats = replica_stats().values()
    assert sum(each["adapters"]["lora_evictions"] for each in stats) - before >= 2
    assert all(len(each["adapters"]["loras_loaded"]) <= 1 for each in stats)


@pytest.mark.parametrize("route", ["/", "/stream"])
def test_an_adapter_that_does_not_load_is_a_422(two_replicas: str, client: httpx.Client, route: str) -> None:
    body = {**SMALL, "loras": [{"path": "missing.safetensors"}]}
    response = client.post(f"{two_replicas}{route}", json=body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["type"] == "adapter_not_found" and error["loc"] == ["body", "loras", 0, "path"]


def test_a_queued_job_with_an_adapter_that_does_not_load_ends_with_its_422(
    two_replicas: str, client: httpx.Client
) -> None:
    body = {**SMALL, "embeddings": [{"path": "tiny-embedding.safetensors", "tokens": ["a</w>", "<s1>"]}]}
    submitted = client.post(f"{two_replicas}/queue/local/sdxl", json=body).json()
    deadline = time.monotonic() + 60
    while client.get(submitted["status_url"]).json()["status"] != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.1)
    result = client.get(submitted["response_url"])
    assert result.status_code == 422, result.text
    assert result.json()["detail"][0]["type"] == "token_in_vocabulary"


def test_requests_with_the_same_runner_hint_go_to_the_same_replica(two_replicas: str, client: httpx.Client) -> None:
    """fal's `X-Fal-Runner-Hint` joins the multiplexed model id: six hinted requests, no adapters, one replica."""

    def completed() -> dict[int, int]:
        return {pid: stats["outcomes"].get("completed", 0) for pid, stats in replica_stats().items()}

    before = completed()
    for index in range(6):
        response = client.post(f"{two_replicas}/", json=SMALL, headers={"x-fal-runner-hint": "session-42"})
        assert response.status_code == 200, response.text
        if index == 0:
            time.sleep(ROUTING_PROPAGATION_S)
    after = completed()
    assert sorted(after[pid] - before[pid] for pid in after) == [0, 6]
