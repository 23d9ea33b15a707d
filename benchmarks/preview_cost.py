"""What one preview costs next to one denoising step: measured time here, and compute by FLOPs.

    python -m benchmarks.preview_cost

A preview that cannot overlap denoising (a CPU has no idle hardware for it) costs its decode time
on every preview step, so the previews' overhead is about (previews per step) x (decode / step).
This prints that ratio as measured for the tiny model on this machine, and as counted in FLOPs for
the tiny model and for full-size SDXL with TAESDXL (built on the meta device: nothing is allocated
or downloaded), so a missed CPU target can be told apart from a design cost that a GPU would pay.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.overhead import step_seconds
from deployments.models import load_models
from deployments.previews import encode_image, latents_to_pixels, pixels_to_image
from deployments.random_sdxl import build_components
from serve_app.config import AppConfig


def flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def unet_step_flops(unet: torch.nn.Module, side: int) -> int:
    """One denoising step with classifier-free guidance: a batch of 2 through the UNet."""
    # The pooled text embedding is what the text-time projection takes besides the 6 size numbers.
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    latents = torch.randn(2, 4, side // 8, side // 8)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, pooled_dim), "time_ids": torch.randn(2, 6)}
    return flops(lambda: unet(latents, torch.tensor([999, 999]), encoder_hidden_states=text, added_cond_kwargs=added))


def decode_flops(decoder: torch.nn.Module, side: int) -> int:
    return flops(lambda: decoder.decode(torch.randn(1, 4, side // 8, side // 8)))


def median_seconds(run: Callable[[], object], repeats: int = 20) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/preview_cost.md"))
    args = parser.parse_args()

    config = AppConfig(model={"source": "tiny", "device": "cpu"})
    tiny = load_models(config.model, config.previews)
    body = {"prompt": "a red fox in the snow", "num_inference_steps": 20, "width": args.size, "height": args.size}
    step = statistics.median(step_seconds(tiny, body) for _ in range(3))
    latents = torch.randn(1, 4, args.size // 8, args.size // 8)
    with torch.inference_mode():
        decode = median_seconds(lambda: latents_to_pixels(tiny.preview_decoder, latents))
        pixels = latents_to_pixels(tiny.preview_decoder, latents)
    encode = median_seconds(lambda: encode_image(pixels_to_image(pixels, 512), "jpeg", 70))

    with torch.no_grad():
        tiny_ratio = decode_flops(tiny.preview_decoder, args.size) / unet_step_flops(tiny.pipeline.unet, args.size)
        sdxl = build_components("meta")
        with torch.device("meta"):
            sdxl_ratios = {
                side: decode_flops(sdxl["preview_decoder"], side) / unet_step_flops(sdxl["unet"], side)
                for side in (1024, 512)
            }

    measured = decode / step
    lines = [
        f"# One preview next to one denoising step ({os.cpu_count()} CPU cores, torch {torch.__version__})",
        "",
        "`python -m benchmarks.preview_cost`. Overhead if nothing overlaps: previews per step x decode / step.",
        "",
        "| what | decode / step | every 5 steps | every step |",
        "|---|---|---|---|",
        f"| tiny, {args.size}px, measured time on this CPU (step {step * 1000:.0f} ms, decode {decode * 1000:.1f} ms, "
        f"JPEG + base64 {encode * 1000:.1f} ms on the encoder thread) | {measured:.1%} | {measured / 5:.1%} | "
        f"{measured:.1%} |",
        f"| tiny, {args.size}px, FLOPs | {tiny_ratio:.1%} | {tiny_ratio / 5:.1%} | {tiny_ratio:.1%} |",
    ]
    lines += [
        f"| SDXL + TAESDXL, {side}px, FLOPs | {ratio:.1%} | {ratio / 5:.1%} | {ratio:.1%} |"
        for side, ratio in sdxl_ratios.items()
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
