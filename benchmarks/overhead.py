"""What streaming costs on top of the bare diffusers pipeline, side by side in one run.

    python -m benchmarks.overhead                 # tiny model on this machine's CPU
    python -m benchmarks.overhead --model sdxl-random --size 1024 --steps 30   # on a GPU

Measures, in --reps rounds that each run every variant once back to back (order rotated per round);
each ratio is given two ways, best run over best run and the median over rounds of the ratio within
a round (on a shared VM the same call varies by 15-35% from one minute to the next):
  1. the bare StableDiffusionXLPipeline call, no callback (the floor);
  2. our engine in-process (`SDXLEngine.generate`): previews off, every 5 steps, every step;
  3. end to end over HTTP SSE through the Serve proxy, ingress and SDXL deployment (configs/local.yaml),
     beside `POST /` with the same body (3', no previews) and `/stream` with one preview (3''): what a
     stream costs over a plain request, and how much of it each preview is;
  4. the reference pattern (benchmarks/reference_app.py: thread + queue + StreamingResponse, uvicorn);
  5. throughput, requests per minute, with 1, 2 and 4 concurrent clients on 1 and 2 replicas
     (one torch thread per replica, so each has its own core; on CUDA one GPU per replica, so the
     2-replica row needs a host with two);
  6. a batch: `num_images: 4` in one `POST /` against four single requests back to back, images per
     second on one replica (--batch-images N; 0 skips it);
  7. image to image in-process at strength 1 (the same steps as text to image), the input PNG checked
     as the ingress checks it and encoded by the VAE: its per-step cost against (2) without previews;
  8. a request with a LoRA already loaded on the replica (rank 16 on every attention projection; PEFT
     layers switched on, not fused: docs/api.md says why) against (2) without previews;
  9. a request with a LoRA the replica has not loaded yet (read from the local disk, loaded, then run):
     the first load's cost, against (8).
Prints a table and the ratios, and writes them to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import ray
import torch
from PIL import Image
from safetensors.torch import save_file

from deployments.engine import EngineConfig, SDXLEngine
from deployments.models import LoadedModels
from deployments.tiny_adapters import random_lora
from serve_app.config import AppConfig
from serve_app.contract.events import RESULT_ONLY, STREAM
from serve_app.contract.requests import GenerationRequest, ImageToImageRequest
from serve_app.inputs.images import check_image, fitted_size
from tests.integration.harness import ServeHarness, free_port, load_config


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
    parser.add_argument("--batch-images", type=int, default=4, help="row (6): the batch's num_images; 0 skips it")
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


def ours(engine: SDXLEngine, body: dict, interval: int) -> float:
    """The engine's own `generate`, as the SDXL replica runs it, minus Serve."""
    request = engine.config.policy.resolve(GenerationRequest(**{**body, "preview_interval": interval or None}))

    async def run() -> float:
        started = time.perf_counter()
        async for _ in engine.generate(request, STREAM if interval else RESULT_ONLY):
            pass  # a failed run raises: it is short, not fast
        return time.perf_counter() - started

    return asyncio.run(run())


def input_png(size: int) -> bytes:
    """An input image for (7): a smooth gradient, as a photo compresses."""
    buffer = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def ours_image_to_image(engine: SDXLEngine, body: dict, png: bytes) -> float:
    """(7): what an image-to-image request adds: the ingress's check of the input (a full decode), then the
    engine's run, which encodes it with the VAE; strength 1 runs every step, as text to image does."""
    started = time.perf_counter()
    checked = check_image(png, "image_url", 64 * 2**20, 4096 * 4096)
    fields = {**body, "image_url": "-", "strength": 1.0}
    request = engine.config.policy.resolve(ImageToImageRequest(**fields), fitted_size(checked), image=checked.data)

    async def run() -> None:
        async for _ in engine.generate(request, RESULT_ONLY):
            pass

    asyncio.run(run())
    return time.perf_counter() - started


class LoraFiles:
    """(8) and (9): one LoRA for the model being measured, in a directory the engine reads; (9) names a new
    copy of it each time, so each of its runs loads one."""

    def __init__(self, models: LoadedModels, directory: Path) -> None:
        self.directory = directory
        save_file(random_lora(models.pipeline.unet, rank=16, std=0.02), directory / "loaded.safetensors")
        self.copies = 0

    def fresh(self) -> str:
        self.copies += 1
        name = f"first-{self.copies}.safetensors"
        (self.directory / name).write_bytes((self.directory / "loaded.safetensors").read_bytes())
        return name


def post_result(url: str, body: dict) -> float:
    """`POST /`: the result as JSON, no previews; the client built before the clock starts, as below."""
    with httpx.Client(timeout=600) as client:
        started = time.perf_counter()
        response = client.post(url, json=body)
        finished = time.perf_counter() - started
    if response.status_code != 200:  # a failed run is short, not fast
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")
    return finished


def over_http(url: str, body: dict) -> tuple[float, float, float | None]:
    """(time to the first SSE data event, time to the end of the stream) seen by the client, and
    the replica's own `timings.total` from our final event (None for the reference app).

    The client is built before the clock starts: building one costs ~55 ms here (its SSL context),
    a cost of the client process, not of the service. Each request still opens its own connection.
    """
    with httpx.Client(timeout=600) as client:
        started = time.perf_counter()
        first = None
        last = ""
        with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data:"):
                    first = first if first is not None else time.perf_counter() - started
                    last = line
        finished = time.perf_counter() - started
    final = json.loads(last[len("data:") :]) if last else {}
    if final.get("type") != "final":  # a failed run is short, not fast
        raise RuntimeError(f"{url} ended without a final image: {str(final)[:300]}")
    return first, finished, final.get("timings", {}).get("total")


def sdxl_actor_options(device: str, **options: float) -> dict:
    """The SDXL replica's whole `ray_actor_options` (the harness replaces the YAML's, it does not merge):
    the YAML's, or `options` instead, plus one GPU on CUDA. Without `num_gpus` Ray before 2.60 hides
    the GPU from the actor (CUDA_VISIBLE_DEVICES=""), and 2.60 does not account for it."""
    if not options:
        sdxl = next(
            d
            for d in load_config("configs/local.yaml")["applications"][0]["deployments"]
            if d["name"] == "SDXLDeployment"
        )
        options = sdxl.get("ray_actor_options", {})
    return {**options, "num_gpus": 1} if device == "cuda" else dict(options)


def _sync(models: LoadedModels) -> None:
    if models.device.type == "cuda":
        torch.cuda.synchronize()


def start_reference(args: argparse.Namespace, device: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="reference_app-", suffix=".log", delete=False)  # noqa: SIM115
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
            device,
        ],  # fmt: skip
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            httpx.get(f"{url}/docs", timeout=1)
            return process, f"{url}/stream"
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError(f"the reference app did not start; its log: {log.name}")


def batch_against_singles(url: str, body: dict, num_images: int) -> tuple[float, float]:
    """(6): images per second of one `POST /` with `num_images` (one batched pipeline call), and of
    `num_images` single requests back to back, each with the seed its image has in the batch."""
    with httpx.Client(timeout=600) as client:

        def post(request: dict) -> None:
            response = client.post(url, json=request)
            if response.status_code != 200:  # a failed run is short, not fast
                raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")

        started = time.perf_counter()
        post({**body, "num_images": num_images})
        batched = time.perf_counter() - started
        started = time.perf_counter()
        for index in range(num_images):
            post({**body, "seed": body["seed"] + index})
        singles = time.perf_counter() - started
    return num_images / batched, num_images / singles


def throughput(url: str, body: dict, clients: int, per_client: int) -> float:
    """Requests per minute with `clients` streaming back to back."""

    def client_loop(index: int) -> None:
        for n in range(per_client):
            over_http(url, {**body, "seed": index * 100 + n})

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return clients * per_client / (time.perf_counter() - started) * 60


BARE = "bare pipeline (1)"
EVERY_5 = "ours in-process, previews every 5 (2)"
EVERY_STEP = "ours in-process, previews every step (2')"
SERVE = "Serve SSE end to end (3)"
SERVE_RESULT = "Serve POST / end to end, no previews (3')"
SERVE_ONE_PREVIEW = "Serve SSE end to end, one preview (3'')"
REFERENCE = "reference pattern, uvicorn (4)"
OURS = "ours in-process, no previews"
IMAGE_TO_IMAGE = "ours image to image, strength 1, no previews (7)"
LORA_LOADED = "ours with a LoRA already loaded, no previews (8)"
LORA_FIRST = "ours with a LoRA loaded first, no previews (9)"
SETTLE_S = 1.0  # before each measurement: the previous one's trailing work (logs, metrics) ends first


@dataclass(frozen=True)
class Sample:
    total: float
    first_event: float | None = None
    replica_total: float | None = None  # our final event's `timings.total` (Serve only)


Round = dict[str, Sample]  # every variant once, back to back, plus "step": one denoising step


def measure_round(variants: dict[str, Callable], models: LoadedModels, body: dict, index: int) -> Round:
    """Each variant once, in an order rotated per round so no variant always follows another."""
    names = list(variants)
    names = names[index % len(names) :] + names[: index % len(names)]
    measured: Round = {}
    for name in names:
        time.sleep(SETTLE_S)
        value = variants[name]()
        if isinstance(value, tuple):  # over HTTP: (first event, total, replica's own total)
            measured[name] = Sample(total=value[1], first_event=value[0], replica_total=value[2])
        else:
            measured[name] = Sample(total=value)
    measured["step"] = Sample(step_seconds(models, body))
    return measured


def best(rounds: list[Round], name: str) -> float:
    """The fastest run: this host's noise only ever slows a run down, so the minimum is the cost."""
    return min(r[name].total for r in rounds)


def ratio(rounds: list[Round], name: str, base: str) -> tuple[float, float]:
    """`name` over `base` two ways: best run over best run, and the median over rounds of the ratio
    within a round (drift of the host between rounds cancels)."""
    return best(rounds, name) / best(rounds, base), statistics.median(r[name].total / r[base].total for r in rounds)


def first_event_over_step(rounds: list[Round], name: str) -> tuple[float, float]:
    """Time to first event minus one denoising step, in ms: best of each, and median within rounds."""
    fastest = min(r[name].first_event for r in rounds) - min(r["step"].total for r in rounds)
    within = statistics.median(r[name].first_event - r["step"].total for r in rounds)
    return fastest * 1000, within * 1000


def first_event_row(rounds: list[Round], name: str) -> float | None:
    if rounds[0][name].first_event is None:
        return None
    return statistics.median(r[name].first_event for r in rounds)


def main() -> None:
    args = parse_args()
    lora_dir = Path(tempfile.mkdtemp(prefix="overhead-loras-"))
    config = AppConfig(
        model={"source": args.model, "device": args.device},
        requests={"timeout_s": 3600},
        adapters={"local_dir": str(lora_dir), "max_file_bytes": 2**31},
    )
    engine = SDXLEngine(EngineConfig.of(config))
    models = engine.models
    loras = LoraFiles(models, lora_dir)
    body = request_body(args)

    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # its own instance, never a cluster
    harness = ServeHarness(free_port())
    device = models.device.type  # every variant on the same device, never a silent fallback
    serve_args = {"model": {"source": args.model, "device": device}}
    base = harness.deploy(
        "bench", "/", args=serve_args, deployments={"SDXLDeployment": {"ray_actor_options": sdxl_actor_options(device)}}
    )
    reference, reference_url = start_reference(args, device)

    png = input_png(args.size)
    variants = {
        BARE: lambda: bare(models, body),
        OURS: lambda: ours(engine, body, 0),
        IMAGE_TO_IMAGE: lambda: ours_image_to_image(engine, body, png),
        LORA_LOADED: lambda: ours(engine, {**body, "loras": [{"path": "loaded.safetensors"}]}, 0),
        LORA_FIRST: lambda: ours(engine, {**body, "loras": [{"path": loras.fresh()}]}, 0),
        EVERY_5: lambda: ours(engine, body, 5),
        EVERY_STEP: lambda: ours(engine, body, 1),
        SERVE: lambda: over_http(f"{base}/stream", body),
        SERVE_RESULT: lambda: post_result(f"{base}/", body),
        SERVE_ONE_PREVIEW: lambda: over_http(f"{base}/stream", {**body, "preview_interval": args.steps}),
        REFERENCE: lambda: over_http(reference_url, body),
    }
    previews = len(range(0, args.steps, 5))  # the stream's: configs/local.yaml previews every 5 steps
    for measure in variants.values():  # warm-up: first-call costs are not what we compare
        measure()
    rounds = [measure_round(variants, models, body, index) for index in range(args.reps)]
    reference.terminate()

    batch_rounds: list[tuple[float, float]] = []
    if args.batch_images:
        batch_against_singles(f"{base}/", body, args.batch_images)  # warm-up: the batch's shapes
        batch_rounds = [batch_against_singles(f"{base}/", body, args.batch_images) for _ in range(args.reps)]

    rows = [
        (
            name,
            statistics.median(r[name].total for r in rounds),
            best(rounds, name),
            *ratio(rounds, name, BARE),
            first_event_row(rounds, name),
        )
        for name in variants
    ]
    # Each ratio two ways: best of the rounds for each side, and the median of within-round ratios.
    ratios: dict[str, tuple[float, float | None]] = {
        "(2) every 5 / (1)": ratio(rounds, EVERY_5, BARE),
        "(2') every step / (1)": ratio(rounds, EVERY_STEP, BARE),
        "(3) Serve SSE / (1)": ratio(rounds, SERVE, BARE),
        "(3) Serve SSE / (4) reference": ratio(rounds, SERVE, REFERENCE),
        "(3) Serve SSE / (3') POST / with the same body": ratio(rounds, SERVE, SERVE_RESULT),
        "(3'') one preview / (3') POST /": ratio(rounds, SERVE_ONE_PREVIEW, SERVE_RESULT),
        "(7) image to image / (2) no previews, same steps": ratio(rounds, IMAGE_TO_IMAGE, OURS),
        "(8) a LoRA loaded / (2) no previews": ratio(rounds, LORA_LOADED, OURS),
        "(9) a LoRA loaded first / (8) loaded": ratio(rounds, LORA_FIRST, LORA_LOADED),
        "(9) - (8): a first load, s": (best(rounds, LORA_FIRST) - best(rounds, LORA_LOADED), None),
        "time to first event (3) - one step, ms": first_event_over_step(rounds, SERVE),
        "time to first event (4) - one step, ms": first_event_over_step(rounds, REFERENCE),
        "(3) client total - replica's own total (transport), ms": (
            min(r[SERVE].total - r[SERVE].replica_total for r in rounds) * 1000,
            statistics.median(r[SERVE].total - r[SERVE].replica_total for r in rounds) * 1000,
        ),
    }

    if previews > 1:
        ratios[f"each further preview of (3), ms: ((3) - (3'')) / {previews - 1}"] = (
            (best(rounds, SERVE) - best(rounds, SERVE_ONE_PREVIEW)) / (previews - 1) * 1000,
            statistics.median(r[SERVE].total - r[SERVE_ONE_PREVIEW].total for r in rounds) / (previews - 1) * 1000,
        )

    if batch_rounds:
        ratios[f"(6) num_images {args.batch_images} / {args.batch_images} single requests, images/s"] = (
            max(batched for batched, _ in batch_rounds) / max(singles for _, singles in batch_rounds),
            statistics.median(batched / singles for batched, singles in batch_rounds),
        )

    tput: dict[tuple[int, int], float] = {}
    if not args.skip_throughput:
        tput_body = {**body, "num_inference_steps": args.throughput_steps, "width": args.throughput_size,
                     "height": args.throughput_size}  # fmt: skip
        # Each replica gets its own core, or its own GPU: two replicas on one GPU would only share it.
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        actor_options = sdxl_actor_options(device, num_cpus=1)
        for replicas in (1, 2) if gpus != 1 else (1,):
            url = harness.deploy(
                "bench",
                "/",
                args={"model": {**serve_args["model"], "torch_threads": 1}},
                deployments={"SDXLDeployment": {"num_replicas": replicas, "ray_actor_options": actor_options}},
            )
            over_http(f"{url}/stream", tput_body)  # warm-up
            for clients in (1, 2, 4):
                tput[(replicas, clients)] = throughput(f"{url}/stream", tput_body, clients, args.requests_per_client)
        if (2, 4) in tput:
            ratios["throughput 2 replicas / 1, 4 clients"] = (tput[(2, 4)] / tput[(1, 4)], None)

    step = statistics.median(r["step"].total for r in rounds)
    report = render(args, models, step, rows, ratios, tput, batch_rounds)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    ray.shutdown()


def render(args, models, step, rows, ratios, tput, batch_rounds) -> str:
    device = torch.cuda.get_device_name() if models.device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    lines = [
        f"# Overhead benchmark: {args.model}, {args.steps} steps, {args.size}x{args.size}, {device}",
        "",
        f"`python -m benchmarks.overhead {' '.join(sys.argv[1:])}`; {platform.python_version()}, torch "
        f"{torch.__version__}; {args.reps} rounds, each running every variant once back to back (order "
        f"rotated). Ratios two ways: best run over best run (the host's noise only slows runs down), and "
        f"the median over rounds of the ratio within a round (drift between rounds cancels). One denoising "
        f"step (median): {step * 1000:.1f} ms.",
        "",
        "| variant | median s | best s | best / best of bare | vs bare, median within rounds | "
        "first event s (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name, median, fastest, ratio_best, ratio_paired, first in rows:
        first_cell = "" if first is None else f"{first:.3f}"
        lines.append(
            f"| {name} | {median:.3f} | {fastest:.3f} | {ratio_best:.3f} | {ratio_paired:.3f} | {first_cell} |"
        )
    lines += ["", "| ratio | best of rounds | median within rounds |", "|---|---|---|"]
    lines += [
        f"| {name} | {fastest:.3f} | {'' if within is None else f'{within:.3f}'} |"
        for name, (fastest, within) in ratios.items()
    ]
    if batch_rounds:
        n = args.batch_images
        lines += [
            "",
            f"Batch (6), images per second on one replica, `POST /` ({args.steps} steps, {args.size}px), best of "
            f"{len(batch_rounds)}:",
            "",
            "| way | images/s |",
            "|---|---|",
            f"| one request, num_images {n} (one pipeline call) | {max(b for b, _ in batch_rounds):.2f} |",
            f"| {n} single requests, back to back | {max(s for _, s in batch_rounds):.2f} |",
        ]
    if tput:
        lines += [
            "",
            f"Throughput, requests/min ({args.throughput_steps} steps, {args.throughput_size}px, "
            f"{args.requests_per_client} per client, 1 torch thread per replica):",
            "",
            "| replicas | 1 client | 2 clients | 4 clients |",
            "|---|---|---|---|",
        ]
        for replicas in sorted({replicas for replicas, _ in tput}):
            lines.append(f"| {replicas} | " + " | ".join(f"{tput[(replicas, c)]:.1f}" for c in (1, 2, 4)) + " |")
        if (2, 4) not in tput:
            lines += ["", "2 replicas not measured: this host has one GPU, and each replica needs its own."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
