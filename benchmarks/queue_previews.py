"""What previews cost a queued job: the same job with `queue.previews` off, on with nobody watching, and
on with a viewer on its status stream (`?previews=1`), measured side by side in one run.

    python -m benchmarks.queue_previews [--rounds 8] [--steps 20] [--size 512]

Deploys `configs/local.yaml` twice in one Ray instance (previews off and on), then runs rounds of one
job per variant, order rotated, each timed from submit to the COMPLETED event on its status stream.
Prints medians, bests and ratios to previews off. The tiny model on a CPU makes a preview's decode a
larger share of a step than TAESDXL's is of SDXL's on a GPU (`benchmarks.preview_cost`): an upper bound.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import httpx
import ray
import yaml
from ray import serve
from ray.serve._private import api as serve_private_api
from ray.serve.schema import ServeDeploySchema

from benchmarks.stream_vs_run import free_port

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "local.yaml"


def deploy() -> dict[str, str]:
    """Two apps, `off` and `on`; their base URLs."""
    template = yaml.safe_load(CONFIG.read_text())["applications"][0]
    apps = []
    for name, previews in (("off", False), ("on", True)):
        app = copy.deepcopy(template)
        app.update(name=name, route_prefix=f"/{name}")
        app["args"].setdefault("queue", {})["previews"] = previews
        app["args"].setdefault("status_server", {})["port"] = free_port()
        apps.append(app)
    port = free_port()
    client = serve_private_api.serve_start(http_options={"host": "127.0.0.1", "port": port})
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": apps}))
    for app in apps:
        while (status := serve.status().applications.get(app["name"])) is None or status.status != "RUNNING":
            time.sleep(0.5)
    return {app["name"]: f"http://127.0.0.1:{port}/{app['name']}" for app in apps}


def queued_job(base: str, body: dict, watch: bool) -> tuple[float, int]:
    """Seconds from submit to COMPLETED on the job's status stream, and the previews the stream carried."""
    with httpx.Client(timeout=600) as client:
        started = time.perf_counter()
        job = client.post(f"{base}/queue/local/sdxl", json=body)
        job.raise_for_status()
        params = {"previews": 1} if watch else {}
        previews = 0
        with client.stream("GET", job.json()["status_url"] + "/stream", params=params) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                previews += event.get("type") == "preview"
                if event.get("status") == "COMPLETED":
                    break
        elapsed = time.perf_counter() - started
        assert client.get(job.json()["response_url"]).status_code == 200
        return elapsed, previews


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--preview-interval", type=int, default=5)
    args = parser.parse_args()
    body = {
        "prompt": "a red fox in the snow",
        "num_inference_steps": args.steps,
        "width": args.size,
        "height": args.size,
        "seed": 0,
        "preview_interval": args.preview_interval,
    }
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    bases = deploy()
    variants = {
        "previews off": lambda: queued_job(bases["off"], body, watch=False),
        "previews on, nobody watching": lambda: queued_job(bases["on"], body, watch=False),
        "previews on, one viewer": lambda: queued_job(bases["on"], body, watch=True),
    }
    for measure in variants.values():
        measure()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    seen: dict[str, list[int]] = {name: [] for name in variants}
    for index in range(args.rounds):
        names = list(variants)[index % len(variants) :] + list(variants)[: index % len(variants)]
        for name in names:
            time.sleep(0.5)
            elapsed, previews = variants[name]()
            times[name].append(elapsed)
            seen[name].append(previews)
    off = statistics.median(times["previews off"])
    print(
        f"queued jobs: {args.steps} steps, {args.size}px, a preview every {args.preview_interval}; {args.rounds} rounds"
    )
    for name, values in times.items():
        print(
            f"{name:30s} median {statistics.median(values):.3f} s  best {min(values):.3f} s  "
            f"median / off {statistics.median(values) / off:.3f}  previews seen {statistics.median(seen[name]):g}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
