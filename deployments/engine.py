"""The SDXL engine: models, the pipeline thread, the one-run-at-a-time slot, warm-up and `generate`.

It runs without Serve (tests and benchmarks drive it directly); `deployments/sdxl.py` wraps it
for Serve. `generate` is an async generator on purpose: Serve delivers a client's disconnect to
it as `asyncio.CancelledError`, which stops the pipeline thread; the slot is released only after
that thread has really stopped, so the next request never shares the device with it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from deployments.generation import END_OF_STREAM, GenerationRun, RunOutcome
from deployments.models import LoadedModels, load_models
from deployments.preview_worker import PreviewSettings, PreviewWorker, start_preview_worker
from deployments.previews import PreviewSchedule
from serve_app.config import AppConfig
from serve_app.schemas import GenerationRequest, StreamEvent

logger = logging.getLogger(__name__)


class SDXLEngine:
    def __init__(
        self,
        config: AppConfig,
        on_preview_rendered: Callable[[float], None] | None = None,
        on_run_finished: Callable[[RunOutcome], None] | None = None,
    ) -> None:
        """Load the models (and warm up when configured); the callbacks feed the deployment's metrics."""
        self.config = config
        self.models: LoadedModels = load_models(config)
        self.previews: PreviewWorker = start_preview_worker(
            self.models.preview_decoder,
            PreviewSettings(max_size=config.preview_max_size, jpeg_quality=config.preview_jpeg_quality),
            on_rendered=on_preview_rendered,
        )
        self._on_run_finished = on_run_finished
        # One pipeline thread: the pipeline is not safe to call concurrently, and a long-lived
        # thread keeps its OpenMP team (a fresh thread per run measured 4.6% slower) and its
        # cuBLAS/cuDNN handles, which the warm-up creates.
        self._pipeline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxl-pipeline")
        self._slot = asyncio.Lock()
        self._unusable_reason: str | None = None
        for request in warmup_requests(config):
            self._warm_up(request)

    @property
    def busy(self) -> bool:
        return self._slot.locked()

    async def generate(
        self, request: GenerationRequest, previews: bool = True, progress: bool = False
    ) -> AsyncIterator[StreamEvent]:
        """Preview events (and progress events when asked), then one final or error event."""
        interval = (request.preview_interval or self.config.preview_interval) if previews else 0
        async with self._slot:
            run = GenerationRun(
                self.models,
                self.previews,
                request,
                PreviewSchedule(interval),
                final_jpeg_quality=self.config.final_jpeg_quality,
                timeout_s=self.config.request_timeout_s,
                progress=progress,
            )
            done = asyncio.wrap_future(self._pipeline_thread.submit(run.execute))
            try:
                while (event := await run.next_event()) is not END_OF_STREAM:
                    yield event
            finally:
                run.cancel()  # a no-op if the run already finished
                outcome = await _wait_through_cancellation(done)
                if outcome.error is not None and outcome.error.fatal:
                    self._unusable_reason = str(outcome.error.detail)  # the CUDA context is gone for good
                if self._on_run_finished is not None:
                    self._on_run_finished(outcome)

    def check_device(self) -> None:
        """Raise if a run left the device unusable, or (CUDA, between runs) if the device has failed.

        Blocks while queued GPU work finishes: call it off the event loop. Skipped while a run holds
        the slot: that run's own outcome reports a failed device, and waiting here would only stall.
        """
        if self._unusable_reason is not None:
            raise RuntimeError(f"pipeline unusable after a device error: {self._unusable_reason}")
        if self.models.device.type == "cuda" and not self.busy:
            torch.cuda.synchronize(self.models.device)

    def _warm_up(self, request: GenerationRequest) -> None:
        """Run one warm-up request as a user's runs: on the pipeline thread, previews through the
        preview worker, the final decode. It pays torch.compile for its shape, CUDA kernel selection,
        that thread's cuBLAS/cuDNN handles, the preview stream and pinned buffers before the replica
        serves anyone. A failure here fails the replica's start."""
        started = time.perf_counter()
        run = GenerationRun(
            self.models,
            self.previews,
            request,
            PreviewSchedule(1),
            final_jpeg_quality=self.config.final_jpeg_quality,
            timeout_s=math.inf,  # compiling may take minutes, past any request's deadline
            on_event=lambda event: None,
        )
        outcome = self._pipeline_thread.submit(run.execute).result()
        if outcome.error is not None:
            size = f"{request.width}x{request.height}"
            raise RuntimeError(f"warm-up at {size} failed: {outcome.error.detail}") from outcome.error
        logger.info(
            "Warmed up at %dx%d, guidance %g, in %.1f s",
            request.width,
            request.height,
            request.guidance_scale,
            time.perf_counter() - started,
        )


def warmup_requests(config: AppConfig) -> list[GenerationRequest]:
    """One short request per warm-up size of the config, with what its requests default to otherwise.

    The guidance matters as much as the size: classifier-free guidance (`guidance_scale` > 1)
    doubles the UNet's batch, another shape for torch.compile. Empty when no warm-up is configured.
    """
    defaults = config.apply_request_defaults(GenerationRequest(prompt="warm-up"))
    short = {"num_inference_steps": 2, "preview_interval": 1, "seed": 0, "output_format": "jpeg"}
    return [
        defaults.model_copy(update={**short, "width": width, "height": height})
        for width, height in config.warmup_image_sizes()
    ]


async def _wait_through_cancellation(done: asyncio.Future | Future) -> RunOutcome:
    """Wait for the pipeline thread to finish even if this task is cancelled again meanwhile."""
    while not done.done():
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            continue
    return done.result()
