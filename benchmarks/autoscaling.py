"""Autoscaling under sustained streaming load, shown: replica count over time next to offered load.

    python -m benchmarks.autoscaling              # clients streaming
    python -m benchmarks.autoscaling --load jobs  # clients submitting queue jobs and polling them

One Ray node declaring 3 logical GPUs (so at most 3 one-GPU replicas fit, whatever `max_replicas`
says), the production deployment settings with shorter delays so the demo takes two minutes, and
the tiny model on the CPU. Load: 1 client, then 6 clients back to back, then none; a client either
streams, or submits a job to the queue and polls its status as fal_client's `subscribe` does.
Queued jobs must scale the replicas as streams do. Writes benchmarks/results/autoscaling[-jobs].md.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from tests.integration.harness import ServeHarness, free_port, stream_events

AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 4,  # more than the 3 GPUs: the cluster, not the config, is the bound here
    "target_ongoing_requests": 1,
    "upscale_delay_s": 3,
    "downscale_delay_s": 20,
}
PHASES = [(10, 1), (50, 6), (60, 0)]  # (seconds, concurrent clients)
BODY = {"prompt": "a red fox", "width": 256, "height": 256, "num_inference_steps": 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", choices=["streams", "jobs"], default="streams")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/autoscaling{'-jobs' if args.load == 'jobs' else ''}.md")

    ray.init(num_cpus=8, num_gpus=3, include_dashboard=False, log_to_driver=False)
    harness = ServeHarness(free_port())
    url = harness.deploy(
        "sdxl",
        "/",
        config_file="serve_config.yaml",
        args={
            "model": {
                "source": "tiny",
                "device": "auto",
                "dtype": "auto",
                "vae": None,
                "warmup_sizes": [],
                "torch_threads": 1,
            },
            "previews": {"decoder": "tiny"},
            "queue": {"store": "memory"},
            "app_id": "local/sdxl",  # run_job's queue route
        },  # fmt: skip
        deployments={
            "SDXLIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
            "SDXLDeployment": {"autoscaling_config": AUTOSCALING, "ray_actor_options": {"num_gpus": 1, "num_cpus": 0}},
        },
    )

    offered = {"clients": 0}
    stop = threading.Event()
    completed = [0]

    def client(index: int) -> None:
        with httpx.Client(timeout=300) as http:
            while not stop.is_set() and index < offered["clients"]:
                if args.load == "jobs":
                    run_job(http, url)
                else:
                    list(stream_events(http, f"{url}/stream", BODY))
                completed[0] += 1

    samples = []
    threads: list[threading.Thread] = []
    started = time.monotonic()
    for seconds, clients in PHASES:
        offered["clients"] = clients
        threads = [t for t in threads if t.is_alive()]
        for index in range(len(threads), clients):
            thread = threading.Thread(target=client, args=(index,), daemon=True)
            thread.start()
            threads.append(thread)
        phase_end = time.monotonic() + seconds
        while time.monotonic() < phase_end:
            states = serve.status().applications["sdxl"].deployments["SDXLDeployment"].replica_states
            samples.append((time.monotonic() - started, clients, states.get("RUNNING", 0), sum(states.values())))
            time.sleep(2)
    stop.set()

    lines = [
        f"# Autoscaling under {'queue jobs' if args.load == 'jobs' else 'streaming load'} "
        "(tiny model, 1 node with 3 logical GPUs)",
        "",
        f"`python -m benchmarks.autoscaling --load {args.load}`; autoscaling_config: `{AUTOSCALING}`; "
        f"each replica `num_gpus: 1`; {completed[0]} {args.load} completed.",
        "",
        "| t (s) | clients | running replicas | replicas incl. pending | |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {t:5.0f} | {c} | {r} | {a} | {'#' * r} |" for t, c, r, a in samples]
    peak = max(r for _, _, r, _ in samples)
    final = samples[-1][2]
    lines += ["", f"Peak running replicas: {peak} (bounded by 3 GPUs); at the end: {final}."]
    report = "\n".join(lines) + "\n"
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    ray.shutdown()
    raise SystemExit(0 if peak == 3 and final == 1 else 1)


def run_job(http: httpx.Client, url: str) -> None:
    """Submit, then poll at fal_client's 10/s until the job completes."""
    job = http.post(f"{url}/queue/local/sdxl", json=BODY).json()
    while http.get(job["status_url"]).json()["status"] != "COMPLETED":
        time.sleep(0.1)


if __name__ == "__main__":
    main()
