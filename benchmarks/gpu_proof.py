"""One command that proves the GPU path: correctness checks, then timings, as one table.

    bash benchmarks/gpu_proof.sh               # on a GPU machine: a venv with CUDA torch, then this
    python -m benchmarks.gpu_proof             # full-size SDXL with random weights on this machine's GPU
    python -m benchmarks.gpu_proof --smoke     # the tiny model on the CPU, small sizes: known to start (CI)

Runs the engine in-process, as the SDXL replica runs it, minus Serve (the Serve path has its own
benchmarks). Checks, each PASS or FAIL with what was seen:
  1. final images are finite and not black (nor one flat colour);
  2. previews arrive, one per `preview_interval` steps;
  3. a cancel frees the device within two steps' time;
  4. the VAE is still in float16 after runs (CUDA; n/a on the CPU);
  5. a seed gives the same image on the CPU (CPU generators; compared at a small size);
  6. device memory (CUDA) or RSS (CPU) back to its baseline after 20 requests.
Timings (medians of --reps): bare diffusers; ours without previews, every 5 steps, every step; compiled
(--compile); Turbo-like 4 steps at 512 without guidance; `num_images: 4` against 4 requests; peak memory.
Writes the table to --out; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from deployments.engine import EngineConfig, SDXLEngine
from serve_app.config import AppConfig
from serve_app.contract.events import RESULT_ONLY, STREAM
from serve_app.contract.requests import GenerationRequest, ResolvedRequest


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, small sizes: checks it runs")
    parser.add_argument("--model", default=None, help="default: sdxl-random (tiny with --smoke)")
    parser.add_argument("--size", type=int, default=None, help="default: 1024 (128 with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="default: 30 (4 with --smoke)")
    parser.add_argument("--reps", type=int, default=None, help="default: 3 (1 with --smoke)")
    parser.add_argument("--compile", action="store_true", help="add the compiled row (minutes of compiling)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_proof.md"))
    args = parser.parse_args()
    smoke = args.smoke
    args.model = args.model or ("tiny" if smoke else "sdxl-random")
    args.size = args.size or (128 if smoke else 1024)
    args.steps = args.steps or (4 if smoke else 30)
    args.reps = args.reps or (1 if smoke else 3)
    return args


def engine_for(model: str, device: str, **model_options: object) -> SDXLEngine:
    config = AppConfig(model={"source": model, "device": device, **model_options}, requests={"timeout_s": 3600})
    return SDXLEngine(EngineConfig.of(config))


def request(engine: SDXLEngine, **fields: object) -> ResolvedRequest:
    return engine.config.policy.resolve(GenerationRequest(**{"prompt": "a red fox in the snow", "seed": 0, **fields}))


def run(engine: SDXLEngine, resolved: ResolvedRequest, previews: bool = True) -> list:
    async def events() -> list:
        return [event async for event in engine.generate(resolved, STREAM if previews else RESULT_ONLY)]

    return asyncio.run(events())


def pixels(file) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(file.url.split(",", 1)[1]))).convert("RGB"), np.float32)


def sync(engine: SDXLEngine) -> None:
    if engine.models.device.type == "cuda":
        torch.cuda.synchronize(engine.models.device)


def timed(engine: SDXLEngine, call: Callable[[], object], reps: int) -> float:
    call()  # warm-up: first-call costs are not what is compared
    times = []
    for _ in range(reps):
        sync(engine)
        started = time.perf_counter()
        call()
        sync(engine)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def memory(engine: SDXLEngine) -> int:
    if engine.models.device.type == "cuda":
        return torch.cuda.memory_allocated(engine.models.device)
    return psutil.Process().memory_info().rss


def checks(engine: SDXLEngine, args: argparse.Namespace) -> list[tuple[str, bool | None, str]]:
    rows: list[tuple[str, bool | None, str]] = []
    body = {"num_inference_steps": args.steps, "width": args.size, "height": args.size, "preview_interval": 5}
    events = run(engine, request(engine, **body))
    final = events[-1]
    image = pixels(final.image)
    finite = bool(np.isfinite(image).all())
    rows.append(("final image finite, not black, not flat", finite and image.mean() > 2 and image.std() > 1,
                 f"mean {image.mean():.1f}, std {image.std():.1f}"))  # fmt: skip
    previews = [event for event in events if event.type == "preview"]
    expected = len(range(0, args.steps, 5))
    rows.append(("previews arrive", len(previews) == expected, f"{len(previews)} of {expected}"))

    step_s = final.timings.inference / args.steps
    freed = cancel_time(engine, request(engine, **{**body, "num_inference_steps": max(args.steps, 8)}))
    rows.append(("a cancel frees the device within two steps", freed <= 2 * step_s + 0.05,
                 f"{freed * 1000:.0f} ms, a step {step_s * 1000:.0f} ms"))  # fmt: skip

    vae = engine.models.pipeline.vae
    if engine.models.device.type == "cuda":
        rows.append(("VAE stays float16", vae.dtype == torch.float16, str(vae.dtype)))
    else:
        rows.append(("VAE stays float16", None, f"n/a on the CPU ({vae.dtype})"))

    small = {"num_inference_steps": 4, "width": 256, "height": 256, "seed": 7}
    here = pixels(run(engine, request(engine, **small), previews=False)[-1].image)
    on_cpu = engine if engine.models.device.type == "cpu" else engine_for(args.model, "cpu", dtype="float32")
    there = pixels(run(on_cpu, request(on_cpu, **small), previews=False)[-1].image)
    difference = float(np.abs(here - there).mean())
    rows.append(("a seed gives the CPU's image", difference < 8.0, f"mean abs difference {difference:.2f} / 255"))

    light = {"num_inference_steps": 2, "width": min(args.size, 512), "height": min(args.size, 512)}
    run(engine, request(engine, **light))
    gc_collect(engine)
    baseline = memory(engine)
    for seed in range(20):
        run(engine, request(engine, **light, seed=seed))
    gc_collect(engine)
    grown = memory(engine) - baseline
    bound = 64 * 2**20 if engine.models.device.type == "cuda" else 256 * 2**20
    rows.append(("memory back to baseline after 20 requests", grown <= bound, f"{grown / 2**20:+.1f} MiB"))
    return rows


def gc_collect(engine: SDXLEngine) -> None:
    gc.collect()
    if engine.models.device.type == "cuda":
        torch.cuda.empty_cache()


def cancel_time(engine: SDXLEngine, resolved: ResolvedRequest) -> float:
    """Seconds from a client leaving (after the second preview) to the slot being free."""

    async def leave() -> float:
        stream = engine.generate(resolved.model_copy(update={"preview_interval": 1}), STREAM)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        started = time.perf_counter()
        await stream.aclose()  # what Serve does when the client goes: the run stops at its next step
        return time.perf_counter() - started if not engine.busy else math.inf

    return asyncio.run(leave())


def timings(engine: SDXLEngine, args: argparse.Namespace) -> list[tuple[str, str]]:
    models = engine.models
    body = {"num_inference_steps": args.steps, "width": args.size, "height": args.size}
    base = request(engine, **body)

    def bare() -> None:
        models.pipeline(prompt=base.prompt, num_inference_steps=args.steps, width=args.size, height=args.size,
                        generator=torch.Generator("cpu").manual_seed(0))  # fmt: skip

    rows = [("bare diffusers", timed(engine, bare, args.reps))]
    rows.append(("ours, no previews", timed(engine, lambda: run(engine, base, previews=False), args.reps)))
    for interval, name in ((5, "ours, previews every 5"), (1, "ours, previews every step")):
        with_previews = base.model_copy(update={"preview_interval": interval})
        rows.append((name, timed(engine, lambda r=with_previews: run(engine, r), args.reps)))
    if args.compile:
        size = f"{args.size}x{args.size}"
        compiled = engine_for(args.model, str(models.device), compile=True, warmup_sizes=[size])
        compiled_s = timed(compiled, lambda: run(compiled, base, previews=False), args.reps)
        rows.append(("ours compiled, no previews", compiled_s))
    turbo = request(engine, num_inference_steps=4, width=min(512, args.size), height=min(512, args.size),
                    guidance_scale=0.0)  # fmt: skip
    turbo_s = timed(engine, lambda: run(engine, turbo, False), args.reps)
    rows.append(("4 steps at 512 without guidance (Turbo's shape)", turbo_s))
    batch = base.model_copy(update={"num_images": 4})
    rows.append(("num_images: 4, one request", timed(engine, lambda: run(engine, batch, False), args.reps)))
    rows.append(("4 requests of one image", timed(engine, lambda: [run(engine, base, False) for _ in range(4)], 1)))
    bare_s = rows[0][1]
    formatted = [(name, f"{seconds:.3f} s ({seconds / bare_s:.2f}x bare)") for name, seconds in rows]
    if models.device.type == "cuda":
        formatted.append(("peak device memory", f"{torch.cuda.max_memory_allocated(models.device) / 2**30:.2f} GiB"))
    return formatted


def main() -> None:
    args = parse_args()
    device = "cpu" if args.smoke else "auto"
    engine = engine_for(args.model, device)
    where = str(engine.models.device)
    if engine.models.device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(engine.models.device)})"
    results = checks(engine, args)
    lines = [
        f"# GPU proof: {args.model}, {where}, {args.size}x{args.size}, {args.steps} steps, torch {torch.__version__}",
        "",
        f"`python -m benchmarks.gpu_proof {' '.join(sys.argv[1:])}`",
        "",
        "| check | result | seen |",
        "|---|---|---|",
        *(f"| {name} | {'n/a' if ok is None else 'PASS' if ok else 'FAIL'} | {seen} |" for name, ok, seen in results),
        "",
        "| timing | median |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in timings(engine, args)),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    # A smoke run only shows the command starts and finishes: timing-bound checks on a busy CI machine say little.
    sys.exit(1 if not args.smoke and any(ok is False for _, ok, _ in results) else 0)


if __name__ == "__main__":
    main()
