"""A head node and two "GPU" worker nodes on one machine, serving a production-shaped config.

Run by tests/integration/test_multinode.py in a process of its own (it owns its Ray cluster):

    python -m tests.integration.multinode_scenario

Each worker declares one logical GPU, so replicas with `num_gpus: 1` are scheduled there; with
no CUDA present the code runs them on the CPU. Prints one JSON object of findings.
"""

from __future__ import annotations

import copy
import json
import threading
import time

import httpx
import ray
import yaml
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve._private import api as serve_private_api
from ray.serve.config import ProxyLocation
from ray.serve.schema import ServeDeploySchema

from tests.integration.harness import REPO, free_port, sdxl_stats, stream_events

BODY = {"prompt": "a red fox", "width": 256, "height": 256, "num_inference_steps": 8, "seed": 1}
LONG = {**BODY, "width": 512, "height": 512, "num_inference_steps": 50}


def production_like_config() -> dict:
    """serve_config.yaml with the tiny model, two replicas, device auto (CPU here), jobs in memory."""
    config = copy.deepcopy(yaml.safe_load((REPO / "serve_config.yaml").read_text()))
    app = config["applications"][0]
    app["args"]["model"] = {"source": "tiny", "vae": None, "device": "auto", "dtype": "auto", "warmup_sizes": []}
    app["args"]["previews"]["decoder"] = "tiny"
    app["args"]["queue"] = {"store": "memory"}
    for deployment in app["deployments"]:
        if deployment["name"] in ("SDXLIngress", "JobQueue"):
            # On the head, like the proxy, so losing a worker only loses model replicas.
            deployment.update(num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": {"head": 0.01}})
        else:
            deployment.pop("autoscaling_config")
            deployment.update(num_replicas=2, ray_actor_options={"num_gpus": 1, "num_cpus": 1})
    return {"applications": [app]}


def replica_nodes(expected: int, timeout_s: float = 120) -> dict[int, str]:
    """pid -> node id of the SDXL replicas, sampled until `expected` distinct replicas answered."""
    found: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < expected and time.monotonic() < deadline:
        stats = sdxl_stats("sdxl")
        found[stats["pid"]] = stats["node_id"]
    return found


def wait_replicas_running(count: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    states: dict = {}
    while time.monotonic() < deadline:
        app = serve.status().applications.get("sdxl")
        deployment = app.deployments.get("SDXLDeployment") if app else None  # absent while building
        states = deployment.replica_states if deployment else {}
        if states.get("RUNNING", 0) == count:
            return
        time.sleep(1)
    raise TimeoutError(f"not {count} running replicas: {states}")


def main() -> None:
    findings: dict = {}
    cluster = Cluster(
        initialize_head=True, connect=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "resources": {"head": 1}}
    )
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    port = free_port()
    # One proxy, on the head: the nodes share this machine's loopback, so they cannot each bind the port.
    client = serve_private_api.serve_start(
        http_options={"host": "127.0.0.1", "port": port}, proxy_location=ProxyLocation.HeadOnly
    )
    client.deploy_apps(ServeDeploySchema.model_validate(production_like_config()))
    wait_replicas_running(2)
    url = f"http://127.0.0.1:{port}"
    worker_ids = {node.node_id for node in workers}

    # 1. Replicas on different worker nodes, streams through the head's proxy.
    placed = replica_nodes(2)
    findings["replica_nodes_distinct"] = len(set(placed.values())) == 2
    findings["replicas_on_workers"] = set(placed.values()) <= worker_ids
    with httpx.Client(timeout=120) as http:
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(list(stream_events(http, f"{url}/stream", BODY))))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    findings["concurrent_streams_final"] = [events[-1].data.get("type") for events in results]

    # 2. Kill a worker node while a long stream runs on it (or its neighbour).
    doomed = workers[0]
    endings = []

    def long_stream() -> None:
        with httpx.Client(timeout=120) as http:
            events = list(stream_events(http, f"{url}/stream", LONG))
            endings.append(events[-1].event + ":" + (events[-1].data.get("error_type") or events[-1].data["type"]))

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    time.sleep(2)
    cluster.remove_node(doomed, allow_graceful=False)
    killed_at = time.monotonic()
    streamer.join(timeout=120)
    findings["stream_during_node_loss"] = endings

    # 3. The service keeps answering on the surviving node.
    answered = []
    with httpx.Client(timeout=120) as http:
        for _ in range(3):
            response = http.post(f"{url}/", json=BODY)
            answered.append(response.status_code)
    findings["answers_after_node_loss"] = answered
    findings["seconds_to_answer_after_loss"] = round(time.monotonic() - killed_at, 1)

    # 4. Capacity comes back: a new GPU node gets the rescheduled replica.
    replacement = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    wait_replicas_running(2)
    placed = replica_nodes(2)
    findings["rescheduled_on_new_node"] = replacement.node_id in placed.values()
    findings["dead_node_unused"] = doomed.node_id not in placed.values()
    print(json.dumps(findings), flush=True)
    ray.shutdown()  # disconnect the driver first: removing the head it is connected to raises
    cluster.shutdown()


if __name__ == "__main__":
    main()
