"""`POST /stream` against `POST /` with the same body, as a new user meets them, for any checkout.

    python benchmarks/stream_vs_run.py                       # this checkout
    PYTHONPATH=/path/to/other python benchmarks/stream_vs_run.py --checkout /path/to/other

Deploys the checkout's `configs/local.yaml` (Ray's workers import the checkout on PYTHONPATH), then
runs rounds of `POST /`, `/stream` (previews every 5 steps) and `/stream` with one preview, order
rotated, 20 steps at 512x512. Prints the medians, bests and ratios to `POST /`. A stream's extra cost
over `POST /` is its previews: one preview against several tells what each costs.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from pathlib import Path

import httpx
import ray
import yaml
from ray import serve
from ray.serve._private import api as serve_private_api
from ray.serve.schema import ServeDeploySchema

BODY = {"prompt": "a red fox in the snow", "num_inference_steps": 20, "width": 512, "height": 512, "seed": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deploy(checkout: Path) -> str:
    app = yaml.safe_load((checkout / "configs" / "local.yaml").read_text())["applications"][0]
    args = app["args"]
    for status in (args.get("status_server"), args):  # this release's section, or an earlier flat key
        if isinstance(status, dict) and ("port" in status or "status_port" in status):
            status["port" if "port" in status else "status_port"] = free_port()
            break
    port = free_port()
    client = serve_private_api.serve_start(http_options={"host": "127.0.0.1", "port": port})
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    while (status := serve.status().applications.get(app["name"])) is None or status.status != "RUNNING":
        time.sleep(0.5)
    return f"http://127.0.0.1:{port}"


def post(base: str, body: dict) -> float:
    with httpx.Client(timeout=600) as client:
        started = time.perf_counter()
        response = client.post(f"{base}/", json=body)
        response.raise_for_status()
        return time.perf_counter() - started


def stream(base: str, body: dict) -> float:
    with httpx.Client(timeout=600) as client:
        started = time.perf_counter()
        with client.stream("POST", f"{base}/stream", json=body) as response:
            response.raise_for_status()
            final = [line for line in response.iter_lines() if line.startswith("data:")][-1]
        assert '"type":"final"' in final, final[:200]
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    base = deploy(args.checkout)
    variants = {
        "POST /": lambda: post(base, BODY),
        "/stream, previews every 5": lambda: stream(base, {**BODY, "preview_interval": 5}),
        "/stream, one preview": lambda: stream(base, {**BODY, "preview_interval": BODY["num_inference_steps"]}),
    }
    for measure in variants.values():
        measure()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(args.rounds):
        names = list(variants)[index % len(variants) :] + list(variants)[: index % len(variants)]
        for name in names:
            time.sleep(0.5)
            times[name].append(variants[name]())
    base_median = statistics.median(times["POST /"])
    print(f"{args.checkout}, {args.rounds} rounds")
    for name, values in times.items():
        print(
            f"{name:28s} median {statistics.median(values):.3f} s  best {min(values):.3f} s  "
            f"median / POST / {statistics.median(values) / base_median:.3f}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
