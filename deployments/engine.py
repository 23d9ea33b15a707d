"""The SDXL engine: models, the pipeline thread, the one-run-at-a-time slot, warm-up and `generate`.

It runs without Serve (tests and benchmarks drive it directly, or through
`deployments.in_process.InProcessGenerationClient`); `deployments/sdxl.py` wraps it for Serve.
`generate` is an async generator on purpose: Serve delivers a client's disconnect to it as
`asyncio.CancelledError`, which stops the pipeline thread; the slot is released only after that
thread has really stopped, so the next request never shares the device with it. The final images
are encoded after the slot is released, on an encoder thread: a request waiting for the slot (with
`max_ongoing_requests: 2` on the deployment) starts denoising while they are.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from deployments.adapter_files import AdapterSources
from deployments.adapters import PreparedAdapters, RequestAdapters
from deployments.failures import classify, device_probe
from deployments.models import LoadedModels, load_models
from deployments.pipeline_run import END_OF_STREAM, GenerationRun, RunOutcome, UnencodedFinal
from deployments.preview_worker import PreviewSettings, PreviewWorker, start_preview_worker
from deployments.previews import PreviewSchedule
from deployments.tasks import task_arguments
from serve_app.config import AdapterConfig, AppConfig, InputConfig, ModelConfig, PreviewConfig, RequestConfig
from serve_app.contract.errors import GenerationFailed, ReplicaFailed, ServiceError
from serve_app.contract.events import RunMode, StreamEvent
from serve_app.contract.requests import GenerationRequest, RequestPolicy, ResolvedRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """The sections of the app's config the engine reads, and the request policy its warm-up resolves with."""

    model: ModelConfig
    previews: PreviewConfig
    requests: RequestConfig
    policy: RequestPolicy
    adapters: AdapterConfig = AdapterConfig()
    inputs: InputConfig = InputConfig()  # adapter URLs: the image inputs' allow-list

    @classmethod
    def of(cls, config: AppConfig) -> EngineConfig:
        return cls(
            config.model, config.previews, config.requests, config.request_policy(), config.adapters, config.inputs
        )


class SDXLEngine:
    def __init__(
        self,
        config: EngineConfig,
        on_preview_rendered: Callable[[float], None] | None = None,
        on_run_finished: Callable[[RunOutcome], None] | None = None,
        on_first_preview: Callable[[float], None] | None = None,
        on_unusable: Callable[[], None] | None = None,
    ) -> None:
        """Load the models (and warm up when configured); the callbacks feed the deployment's metrics
        (`on_first_preview` gets the seconds from `generate` being called to its first preview);
        `on_unusable` is called once when a fatal device error leaves the engine unusable (the
        deployment then leaves service)."""
        self.config = config
        self.models: LoadedModels = load_models(config.model, config.previews)
        self.previews: PreviewWorker = start_preview_worker(
            self.models.preview_decoder,
            PreviewSettings(max_size=config.previews.max_size, jpeg_quality=config.previews.jpeg_quality),
            on_rendered=never_raising(on_preview_rendered),
        )
        self._probe = device_probe(self.models.device)  # after a failure: did the device survive it?
        sources = AdapterSources.of(config.adapters, config.inputs, config.model.cache_dir)
        self.adapters = RequestAdapters(self.models.pipeline, config.adapters, sources)
        self._on_run_finished = never_raising(on_run_finished)
        self._on_first_preview = never_raising(on_first_preview)
        self._on_unusable = never_raising(on_unusable)
        # One pipeline thread: the pipeline is not safe to call concurrently, and a long-lived
        # thread keeps its OpenMP team (a fresh thread per run measured 4.6% slower) and its
        # cuBLAS/cuDNN handles, which the warm-up creates.
        self._pipeline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxl-pipeline")
        # Final images are encoded here, off the pipeline thread and after the slot is free. PIL releases
        # the GIL while it compresses; two threads let one request's encode overlap another's.
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sdxl-encode")
        self._slot = asyncio.Lock()
        self._unusable_reason: str | None = None
        self._run: GenerationRun | None = None  # the run holding the slot: the watchdog reads its progress
        for request in warmup_requests(config.model, config.policy):
            self._warm_up(request)

    @property
    def busy(self) -> bool:
        return self._slot.locked()

    @property
    def usable(self) -> bool:
        return self._unusable_reason is None

    async def generate(self, request: ResolvedRequest, mode: RunMode) -> AsyncIterator[StreamEvent]:
        """Preview events (and progress events) as `mode` asks, then the final event; a failed run raises
        its catalog error after the slot is free."""
        called = time.perf_counter()
        outcome: RunOutcome | None = None
        unencoded: UnencodedFinal | None = None
        self._refuse_if_unusable()
        task_inputs = await self._task_inputs(request)  # decoded and resized before the slot: no GPU waits
        adapters = await self.adapters.prepare(request)  # files found and read before the slot too
        async with self._slot:
            self._refuse_if_unusable()  # a run ahead of this one, waited for, may have killed the device
            await self._apply_adapters(adapters)
            run = GenerationRun(
                self.models,
                self.previews,
                request,
                PreviewSchedule(request.preview_interval if mode.previews else 0),
                final_jpeg_quality=self.config.requests.final_jpeg_quality,
                timeout_s=self.config.requests.timeout_s,
                progress=mode.progress,
                on_first_preview=self._first_preview_timer(called),
                probe=self._probe,
                task_inputs=task_inputs,
            )
            self._run = run
            # In the caller's context: Serve's log lines from the pipeline thread then carry the request id.
            execute = contextvars.copy_context().run
            done = asyncio.wrap_future(self._pipeline_thread.submit(execute, run.execute))
            try:
                while (event := await run.next_event()) is not END_OF_STREAM:
                    if isinstance(event, UnencodedFinal):
                        unencoded = event  # encoded below, once the next request may have the device
                    else:
                        yield event
            finally:
                run.cancel()  # a no-op if the run already finished
                outcome = await _wait_through_cancellation(done)
                self._run = None
                if outcome.error is not None and outcome.error.fatal:
                    self._mark_unusable(outcome.error.error_type)  # the CUDA context is gone for good
                else:
                    await self._clear_adapters(adapters)
                if self._on_run_finished is not None:
                    self._on_run_finished(outcome)
        if outcome.error is not None:
            raise outcome.error
        if unencoded is not None:
            execute = contextvars.copy_context().run  # the encoder's log lines carry the request id too
            try:
                final = await asyncio.wrap_future(self._encoder.submit(execute, unencoded.encode))
            except Exception as error:
                logger.exception("Encoding the final images failed")
                raise GenerationFailed("the generation failed: encoding its images failed") from error
            yield final

    async def _on_pipeline_thread(self, function: Callable[..., None], *args: object) -> None:
        """`function` on the pipeline thread, waited for to its end even when cancelled (it changes the models);
        the cancellation is raised after."""
        future = asyncio.wrap_future(self._pipeline_thread.submit(function, *args))
        cancelled = False
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                cancelled = True
        future.result()
        if cancelled:
            raise asyncio.CancelledError

    async def _apply_adapters(self, adapters: PreparedAdapters) -> None:
        """The run's LoRAs on and its tokens added; a refused adapter's 422 as it is, any other failure as
        `generation_failed`, with everything undone either way."""
        if not adapters:
            return
        try:
            await self._on_pipeline_thread(self.adapters.apply, adapters)
        except (ServiceError, asyncio.CancelledError):
            await self._clear_adapters(adapters)
            raise
        except Exception as error:
            logger.exception("Loading a run's adapters failed")
            failure = classify(error, GenerationFailed, self._probe)  # out of memory; a device that died
            if failure.fatal:
                self._mark_unusable(failure.error_type)
            else:
                await self._clear_adapters(adapters)
            raise failure from error

    async def _clear_adapters(self, adapters: PreparedAdapters) -> None:
        """The run's adapters off again. If that fails, the next run would see them: leave service."""
        if not adapters:
            return
        try:
            await self._on_pipeline_thread(self.adapters.clear, adapters)
        except Exception:
            logger.exception("Switching a run's adapters off failed; this replica leaves service")
            self._mark_unusable("adapter failure")

    def _mark_unusable(self, reason: str) -> None:
        """From now on every request is refused (`replica_failed`, retried elsewhere); the deployment leaves
        service."""
        if self._unusable_reason is None:
            self._unusable_reason = reason
            if self._on_unusable is not None:
                self._on_unusable()

    async def _task_inputs(self, request: ResolvedRequest) -> dict[str, Any]:
        """The task's pipeline arguments, the input images decoded and resized on an encoder thread."""
        if request.task == "text-to-image":
            return task_arguments(request)
        try:
            return await asyncio.wrap_future(self._encoder.submit(task_arguments, request))
        except Exception as error:  # checked at the ingress: only a bug or a replica out of memory gets here
            logger.exception("Decoding the input images failed")
            raise GenerationFailed("the generation failed: its input images could not be decoded") from error

    def _refuse_if_unusable(self) -> None:
        """Once the device is gone, every request fails at once as retryable: its caller (the relay, the
        job queue) tries another replica rather than meet a 500 here until the health check notices."""
        if self._unusable_reason is not None:
            raise ReplicaFailed(f"this model replica left service after a {self._unusable_reason}")

    def check_device(self) -> None:
        """Raise if a run left the device unusable, or (CUDA, between runs) if the device has failed.

        Blocks while queued GPU work finishes: call it off the event loop. Skipped while a run holds
        the slot: that run's own outcome reports a failed device, and waiting here would only stall.
        """
        if self._unusable_reason is not None:
            raise RuntimeError(f"pipeline unusable after a {self._unusable_reason}")
        run = self._run
        if run is not None and time.monotonic() - run.last_progress > self.config.model.watchdog_s:
            # No step and no preview for that long: a kernel that never returns. Nothing will free the slot.
            logger.error("No progress for %g s: the device is hung; leaving service", self.config.model.watchdog_s)
            self._mark_unusable("hung device")
            raise RuntimeError(f"no progress for {self.config.model.watchdog_s:g} s: the device is hung")
        if self.models.device.type == "cuda" and not self.busy:
            torch.cuda.synchronize(self.models.device)

    def _first_preview_timer(self, called: float) -> Callable[[], None] | None:
        if self._on_first_preview is None:
            return None
        report = self._on_first_preview
        return lambda: report(time.perf_counter() - called)

    def _warm_up(self, request: ResolvedRequest) -> None:
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
            final_jpeg_quality=self.config.requests.final_jpeg_quality,
            timeout_s=math.inf,  # compiling may take minutes, past any request's deadline
            on_event=lambda event: None,
            probe=self._probe,
            task_inputs=task_arguments(request),
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


def never_raising(callback: Callable[..., None] | None) -> Callable[..., None] | None:
    """`callback` (metrics, mostly) with its exceptions logged: a failing metric must not fail a generation,
    nor kill the pipeline or preview thread it is called on."""
    if callback is None:
        return None

    def guarded(*args: object) -> None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - logged; the run goes on
            logger.exception("A callback failed (%s); the generation goes on", getattr(callback, "__name__", callback))

    return guarded


def warmup_requests(model: ModelConfig, policy: RequestPolicy) -> list[ResolvedRequest]:
    """One short request per warm-up size of the config, with what its requests default to otherwise.

    The guidance matters as much as the size: classifier-free guidance (`guidance_scale` > 1)
    doubles the UNet's batch, another shape for torch.compile. Empty when no warm-up is configured.
    """
    defaults = policy.resolve(GenerationRequest(prompt="warm-up", seed=0))
    short = {"num_inference_steps": 2, "preview_interval": 1, "output_format": "jpeg"}
    return [
        defaults.model_copy(update={**short, "width": width, "height": height})
        for width, height in model.warmup_image_sizes()
    ]


async def _wait_through_cancellation(done: asyncio.Future | Future) -> RunOutcome:
    """Wait for the pipeline thread to finish even if this task is cancelled again meanwhile."""
    while not done.done():
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            continue
    return done.result()
