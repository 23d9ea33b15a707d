"""The SDXL replica's custom Serve metrics. Ray exports them with a `ray_` prefix on each node's metrics port,
with Serve's `deployment`, `replica` and `application` tags added. Create inside a replica."""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]


class SDXLMetrics:
    def __init__(self) -> None:
        self.time_to_first_preview = Histogram(
            "sdxl_time_to_first_preview_seconds",
            description="From the request reaching the SDXL replica to its first preview event.",
            boundaries=SECONDS,
        )
        self.steps_per_second = Histogram(
            "sdxl_denoising_steps_per_second",
            description="Denoising speed of each run (steps over the time from pipeline start to last step).",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200],
        )
        self.preview_encode = Histogram(
            "sdxl_preview_encode_seconds",
            description="TAESD decode plus JPEG and base64 encoding of one preview, off the denoising loop.",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
        )
        self.requests = Counter(
            "sdxl_requests_total",
            description="Generations by outcome (completed, cancelled, failed) and error type.",
            tag_keys=("outcome", "error_type"),
        )
