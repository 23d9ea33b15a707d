"""What streaming costs on top of the bare diffusers pipeline, side by side in one run.

    python -m benchmarks.overhead                 # tiny model on this machine's CPU
    python -m benchmarks.overhead --model sdxl-random --size 1024 --steps 30   # on a GPU

Measures (variants interleaved so drift hits all alike; ratios from the best of --reps, which on a
shared, noisy host estimates the true cost better than the median; medians and spread shown too):
  1. the bare StableDiffusionXLPipeline call, no callback (the floor);
  2. our run in-process (GenerationRun + PreviewWorker): previews off, every 5 steps, every step;
  3. end to end over HTTP SSE through the Serve proxy, ingress and SDXL deployment (configs/local.yaml);
  4. the reference pattern (benchmarks/reference_app.py: thread + queue + StreamingResponse, uvicorn);
  5. throughput, requests per minute, with 1, 2 and 4 concurrent clients on 1 and 2 replicas
     (one torch thread per replica, so each has its own core).
Prints a table and the ratios, and writes them to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ray
import torch

from deployments.generation import GenerationRun
from deployments.models import LoadedModels, load_models
from deployments.preview_worker import PreviewSettings, PreviewWorker
from deployments.previews import PreviewSchedule
from serve_app.config import AppConfig
from serve_app.schemas import GenerationRequest
from tests.integration.harness import ServeHarness, free_port


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--throughput-steps", type=int, default=10)
    parser.add_argument("--throughput-size", type=int, default=384)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.md"))
    return parser.parse_args()


def request_body(args: argparse.Namespace, seed: int = 0) -> dict:
    return {"prompt": "a red fox in the snow", "num_inference_steps": args.steps, "width": args.size,
            "height": args.size, "seed": seed}  # fmt: skip


def bare(models: LoadedModels, body: dict) -> float:
    started = time.perf_counter()
    models.pipeline(
        prompt=body["prompt"],
        num_inference_steps=body["num_inference_steps"],
        width=body["width"],
        height=body["height"],
        generator=torch.Generator(device=models.device).manual_seed(body["seed"]),
    )
    _sync(models)
    return time.perf_counter() - started


def step_seconds(models: LoadedModels, body: dict) -> float:
    """Median time of one denoising step (CFG batch), from step-end callback timestamps."""
    stamps: list[float] = []

    def on_step_end(pipe, step, timestep, kwargs):
        _sync(models)
        stamps.append(time.perf_counter())
        return {}

    models.pipeline(
        prompt=body["prompt"],
        num_inference_steps=body["num_inference_steps"],
        width=body["width"],
        height=body["height"],
        callback_on_step_end=on_step_end,
    )
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def ours(models: LoadedModels, previews: PreviewWorker, body: dict, interval: int) -> float:
    async def run() -> float:
        generation = GenerationRun(
            models, previews, GenerationRequest(**body), PreviewSchedule(interval), 95, timeout_s=3600
        )
        started = time.perf_counter()
        done = asyncio.get_running_loop().run_in_executor(None, generation.execute)
        while await generation.next_event() is not None:
            pass
        await done
        return time.perf_counter() - started

    return asyncio.run(run())


def over_http(url: str, body: dict) -> tuple[float, float, float | None]:
    """(time to the first SSE data event, time to the end of the stream) seen by the client, and
    the replica's own `timings.total` from our final event (None for the reference app)."""
    started = time.perf_counter()
    first = None
    last = ""
    with httpx.Client(timeout=600) as client, client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:"):
                first = first if first is not None else time.perf_counter() - started
                last = line
    replica = json.loads(last[len("data:") :]).get("timings", {}).get("total")
    return first, time.perf_counter() - started, replica


def _sync(models: LoadedModels) -> None:
    if models.device.type == "cuda":
        torch.cuda.synchronize()


def start_reference(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.reference_app",
            "--port",
            str(port),
            "--model",
            args.model,
            "--device",
            args.device,
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            httpx.get(f"{url}/docs", timeout=1)
            return process, f"{url}/stream"
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError("the reference app did not start")


def throughput(url: str, body: dict, clients: int, per_client: int) -> float:
    """Requests per minute with `clients` streaming back to back."""

    def client_loop(index: int) -> None:
        for n in range(per_client):
            over_http(url, {**body, "seed": index * 100 + n})

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return clients * per_client / (time.perf_counter() - started) * 60


def main() -> None:
    args = parse_args()
    config = AppConfig(model=args.model, device=args.device)
    models = load_models(config)
    previews = PreviewWorker(models.preview_decoder, PreviewSettings(512, 70))
    body = request_body(args)

    ray.init(include_dashboard=False, log_to_driver=False)
    harness = ServeHarness(free_port())
    serve_args = {"model": args.model, "device": args.device}
    base = harness.deploy("bench", "/", args=serve_args)
    reference, reference_url = start_reference(args)

    variants = {
        "bare pipeline (1)": lambda: bare(models, body),
        "ours in-process, no previews": lambda: ours(models, previews, body, 0),
        "ours in-process, previews every 5 (2)": lambda: ours(models, previews, body, 5),
        "ours in-process, previews every step (2')": lambda: ours(models, previews, body, 1),
        "Serve SSE end to end (3)": lambda: over_http(f"{base}/stream", body),
        "reference pattern, uvicorn (4)": lambda: over_http(reference_url, body),
    }
    samples: dict[str, list] = {name: [] for name in variants}
    for measure in variants.values():  # warm-up: first-call costs are not what we compare
        measure()
    for _ in range(args.reps):
        for name, measure in variants.items():
            samples[name].append(measure())
    reference.terminate()
    step = step_seconds(models, body)

    def totals(name: str) -> list[float]:
        return [v[1] if isinstance(v, tuple) else v for v in samples[name]]

    def total(name: str) -> float:
        return min(totals(name))

    def first_event(name: str) -> float:
        return min(v[0] for v in samples[name])

    floor = total("bare pipeline (1)")
    rows = [
        (name, total(name), total(name) / floor, statistics.median(totals(name)), max(totals(name)))
        for name in variants
    ]
    ratios = {
        "(2) every 5 / (1)": total("ours in-process, previews every 5 (2)") / floor,
        "(2') every step / (1)": total("ours in-process, previews every step (2')") / floor,
        "(3) Serve SSE / (1)": total("Serve SSE end to end (3)") / floor,
        "(3) Serve SSE / (4) reference": total("Serve SSE end to end (3)") / total("reference pattern, uvicorn (4)"),
        "time to first event (3) - one step, ms": (first_event("Serve SSE end to end (3)") - step) * 1000,
        "time to first event (4) - one step, ms": (first_event("reference pattern, uvicorn (4)") - step) * 1000,
        "(3) client total - replica's own total (transport), ms, median": statistics.median(
            (total_s - replica_s) * 1000 for _, total_s, replica_s in samples["Serve SSE end to end (3)"]
        ),
        "(3) replica's own total, best / (2) in-process": min(
            replica_s for _, _, replica_s in samples["Serve SSE end to end (3)"]
        )
        / total("ours in-process, previews every 5 (2)"),
    }

    tput: dict[tuple[int, int], float] = {}
    if not args.skip_throughput:
        tput_body = {**body, "num_inference_steps": args.throughput_steps, "width": args.throughput_size,
                     "height": args.throughput_size}  # fmt: skip
        for replicas in (1, 2):
            url = harness.deploy(
                "bench",
                "/",
                args={**serve_args, "torch_threads": 1},
                deployments={"SDXLDeployment": {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 1}}},
            )
            over_http(f"{url}/stream", tput_body)  # warm-up
            for clients in (1, 2, 4):
                tput[(replicas, clients)] = throughput(f"{url}/stream", tput_body, clients, args.requests_per_client)
        ratios["throughput 2 replicas / 1, 4 clients"] = tput[(2, 4)] / tput[(1, 4)]

    report = render(args, models, step, rows, samples, ratios, tput, first_event)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    ray.shutdown()


def render(args, models, step, rows, samples, ratios, tput, first_event) -> str:
    device = torch.cuda.get_device_name() if models.device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    lines = [
        f"# Overhead benchmark: {args.model}, {args.steps} steps, {args.size}x{args.size}, {device}",
        "",
        f"`python -m benchmarks.overhead {' '.join(sys.argv[1:])}`; {platform.python_version()}, torch "
        f"{torch.__version__}; best of {args.reps} (median and worst beside it); one denoising step "
        f"(median): {step * 1000:.1f} ms.",
        "",
        "| variant | best s | vs bare | median s | worst s | first event s (best) |",
        "|---|---|---|---|---|---|",
    ]
    for name, seconds, ratio, median, worst in rows:
        first = f"{first_event(name):.3f}" if isinstance(samples[name][0], tuple) else ""
        lines.append(f"| {name} | {seconds:.3f} | {ratio:.3f} | {median:.3f} | {worst:.3f} | {first} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in ratios.items()]
    if tput:
        lines += [
            "",
            f"Throughput, requests/min ({args.throughput_steps} steps, {args.throughput_size}px, "
            f"{args.requests_per_client} per client, 1 torch thread per replica):",
            "",
            "| replicas | 1 client | 2 clients | 4 clients |",
            "|---|---|---|---|",
        ]
        for replicas in (1, 2):
            lines.append(f"| {replicas} | " + " | ".join(f"{tput[(replicas, c)]:.1f}" for c in (1, 2, 4)) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
