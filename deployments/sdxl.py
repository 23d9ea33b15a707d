"""The SDXL deployment: loads the models once, streams one generation at a time, reports health.

`generate` is an async generator on purpose: Serve delivers a client's disconnect to it as
`asyncio.CancelledError`, which stops the pipeline thread; the pipeline slot is released only
after that thread has really stopped, so the next request never shares the device with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

import psutil
import ray
import torch
from ray import serve

from deployments.generation import END_OF_STREAM, GenerationRun
from deployments.models import load_models
from deployments.preview_worker import PreviewSettings, PreviewWorker
from deployments.previews import PreviewSchedule, latents_to_pixels
from serve_app.config import AppConfig
from serve_app.metrics import SDXLMetrics
from serve_app.schemas import GenerationRequest

logger = logging.getLogger("ray.serve")


@serve.deployment
class SDXLDeployment:
    def __init__(self, config: AppConfig) -> None:
        started = time.perf_counter()
        self._config = config
        self._models = load_models(config)
        self._metrics = SDXLMetrics()
        self._previews = PreviewWorker(
            self._models.preview_decoder,
            PreviewSettings(max_size=config.preview_max_size, jpeg_quality=config.preview_jpeg_quality),
            on_rendered=self._metrics.preview_encode.observe,
        )
        if config.warmup_size:
            self._warm_up(config.warmup_size)
        # One pipeline thread per replica: the pipeline is not safe to call concurrently.
        self._pipeline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxl-pipeline")
        self._pipeline_slot = asyncio.Lock()
        self._unusable_reason: str | None = None
        self._startup_seconds = time.perf_counter() - started  # model load (+ warm-up)
        self._outcomes: Counter[str] = Counter()
        self._steps_run = 0

    async def generate(self, request: dict, previews: bool = True) -> AsyncIterator[dict]:
        """Yield preview events, then one final or error event. `request` is a `GenerationRequest` dict."""
        arrived = time.perf_counter()
        parsed = GenerationRequest.model_validate(request)
        interval = (parsed.preview_interval or self._config.preview_interval) if previews else 0
        async with self._pipeline_slot:
            run = GenerationRun(
                self._models,
                self._previews,
                parsed,
                PreviewSchedule(interval),
                final_jpeg_quality=self._config.final_jpeg_quality,
                timeout_s=self._config.request_timeout_s,
            )
            done = asyncio.wrap_future(self._pipeline_thread.submit(run.execute))
            first_preview = True
            try:
                while (event := await run.next_event()) is not END_OF_STREAM:
                    if event["type"] == "preview" and first_preview:
                        first_preview = False
                        self._metrics.time_to_first_preview.observe(time.perf_counter() - arrived)
                    if event.get("error_type") == "device_error":
                        self._unusable_reason = event["detail"]  # the CUDA context is gone for good
                    yield event
            finally:
                run.cancel()  # a no-op if the run already finished
                await _wait_through_cancellation(done)
                self._record(run)

    def _record(self, run: GenerationRun) -> None:
        self._outcomes[run.outcome] += 1
        self._steps_run += run.steps_completed
        self._metrics.requests.inc(tags={"outcome": run.outcome, "error_type": run.error_type or ""})
        if run.outcome == "completed" and run.denoise_seconds > 0:
            self._metrics.steps_per_second.observe(run.steps_completed / run.denoise_seconds)

    def _warm_up(self, size: int) -> None:
        """Pay first-call costs (torch.compile, CUDA kernel selection) before Serve marks the replica ready."""
        started = time.perf_counter()
        decoder = self._models.preview_decoder

        def decode_a_preview(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
            latents_to_pixels(decoder, callback_kwargs["latents"])
            return {}

        # The pipeline's own decode path (with SDXL's VAE upcast), as a real request runs it.
        with torch.inference_mode():
            self._models.pipeline(
                prompt="warm-up",
                num_inference_steps=2,
                width=size,
                height=size,
                output_type="pt",
                callback_on_step_end=decode_a_preview,
            )
        logger.info("Warmed up at %dx%d in %.1f s", size, size, time.perf_counter() - started)

    def stats(self) -> dict:
        """Counters for operators and tests: outcomes, steps run, and what could leak (threads, memory)."""
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": str(self._models.device),
            "startup_seconds": self._startup_seconds,
            "outcomes": dict(self._outcomes),
            "steps_run": self._steps_run,
            "busy": self._pipeline_slot.locked(),
            "previews_dropped": self._previews.dropped,
            "threads": threading.active_count(),
            "rss_bytes": psutil.Process().memory_info().rss,
        }

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if self._unusable_reason is not None:
            raise RuntimeError(f"pipeline unusable after a device error: {self._unusable_reason}")
        if self._models.device.type == "cuda":
            torch.cuda.synchronize(self._models.device)  # raises if the device has failed


async def _wait_through_cancellation(done: asyncio.Future | Future) -> None:
    """Wait for the pipeline thread to finish even if this task is cancelled again meanwhile."""
    while not done.done():
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            continue
