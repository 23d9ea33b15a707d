"""One request on the pipeline: runs on the engine's pipeline thread, feeds events to asyncio.

Cancellation and deadlines are checked in the pipeline's `callback_on_step_end`, so denoising
stops within one step. We raise there rather than set diffusers' `interrupt`, because
`interrupt` skips the remaining steps but still runs the full VAE decode.

The final images leave the device once, as 8 bits (converted there; the safety checker reads them
there too); the run hands them on unencoded (`UnencodedFinal`), and the engine encodes them after it
has released the slot, so a PNG's encode (about 260 ms a 1024x1024 image) never holds the device.

The run's `RunOutcome`, not an event a departed client may never read, is what tells the engine
whether the device survived, and carries the error the engine raises to its caller.

A request for `num_images` images is one batched pipeline call (`num_images_per_prompt`) with one
torch Generator per image, seeded `seed + i` for image i: the same seed reproduces the whole batch,
and image i starts from the same noise as a single-image request with seed `seed + i`. Previews show
the batch's first image (the final event's `image`). The deployment's safety checker, if it has one,
then checks every image (`has_nsfw_concepts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from deployments.failures import DeviceProbe, classify
from deployments.models import LoadedModels
from deployments.preview_worker import PreviewRequest, PreviewWorker
from deployments.previews import PreviewSchedule, encode_image, final_pixels
from deployments.step_clock import StepClock
from serve_app.contract.errors import DeadlineExceeded, DeviceError, GenerationCancelled, GenerationFailed, ServiceError
from serve_app.contract.events import FinalEvent, PreviewEvent, ProgressEvent, StreamEvent, Timings
from serve_app.contract.requests import ResolvedRequest

logger = logging.getLogger("ray.serve")  # Serve's logger: its lines carry the request id

END_OF_STREAM = None


@dataclass(frozen=True)
class UnencodedFinal:
    """The final event with its images still 8-bit pixels (HWC, on the host): `encode` makes the event.
    The engine calls it after the run has released the slot, off the pipeline thread."""

    pixels: list[np.ndarray]
    request: ResolvedRequest
    has_nsfw_concepts: list[bool | None]
    inference_s: float
    started: float  # perf_counter at the pipeline's start: `timings.total` runs to the end of the encode
    jpeg_quality: int

    def encode(self) -> FinalEvent:
        request = self.request
        files = [encode_image(Image.fromarray(each), request.output_format, self.jpeg_quality) for each in self.pixels]
        return FinalEvent(
            image=files[0],
            images=files,
            seed=request.seed,
            timings=Timings(inference=self.inference_s, total=time.perf_counter() - self.started),
            prompt=request.prompt,
            has_nsfw_concepts=self.has_nsfw_concepts,
        )


RunEvent = StreamEvent | UnencodedFinal
EventSink = Callable[[RunEvent | None], None]  # called on the pipeline or preview thread


RunStatus = Literal["completed", "cancelled", "failed"]


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, returned by `GenerationRun.execute`; `error` is set when it failed."""

    status: RunStatus
    steps_completed: int
    denoise_seconds: float  # pipeline start to the end of the last step
    error: ServiceError | None = None


class GenerationRun:
    """Create on the event loop, `execute` on the pipeline thread, read with `next_event`.

    `on_event` replaces the queue that `next_event` reads (the engine's warm-up ignores its events);
    without it the run must be created on the event loop that reads them.
    """

    def __init__(
        self,
        models: LoadedModels,
        previews: PreviewWorker,
        request: ResolvedRequest,
        schedule: PreviewSchedule,
        *,
        task_inputs: dict[str, Any],
        final_jpeg_quality: int,
        timeout_s: float,
        progress: bool = False,
        on_event: EventSink | None = None,
        on_first_preview: Callable[[], None] | None = None,
        probe: DeviceProbe | None = None,
    ) -> None:
        """`probe` (a GPU's `deployments.failures.device_probe`) decides, after a failure, whether the device
        survived it; it is called on the pipeline thread, the one that drives the device. `task_inputs`:
        the task's pipeline arguments (`deployments.tasks.task_arguments`), made by the engine beforehand,
        off the slot."""
        self._models = models
        self._previews = previews
        self._request = request
        self._schedule = schedule
        self._final_jpeg_quality = final_jpeg_quality
        self._timeout_s = timeout_s
        self._progress = progress
        self._events: asyncio.Queue[RunEvent | None] = asyncio.Queue()
        self._on_event = on_event or _threadsafe_put(asyncio.get_running_loop(), self._events)
        self._cancelled = threading.Event()
        self._probe = probe
        self._task_inputs = task_inputs
        self._preview_error: BaseException | None = None  # as the preview worker reported it, unclassified
        self._preview_failure: ServiceError | None = None
        self._deadline = float("inf")
        self._clock = StepClock(models.device)
        self._steps_completed = 0
        self._on_first_preview = on_first_preview
        self.last_progress = time.monotonic()  # a step or a preview: what the engine's watchdog reads

    def cancel(self) -> None:
        """Ask the run to stop at the next step boundary; safe from any thread."""
        self._cancelled.set()

    async def next_event(self) -> RunEvent | None:
        """The next event (the final one unencoded), or `END_OF_STREAM` after it (or once a failed run ended)."""
        return await self._events.get()

    def execute(self) -> RunOutcome:
        """Run the pipeline to the end; always finishes the event stream, whatever happens."""
        try:
            outcome = self._run()
        finally:
            # Waits for a preview still rendering (its failure counts below), but not for ever.
            if not self._previews.discard(self._preview_wait_s()) and self._classified_preview_error() is None:
                self._preview_failure = preview_hung(self._timeout_s)
            self._emit(END_OF_STREAM)
        return self._with_fatal_preview_failure(outcome)

    def _run(self) -> RunOutcome:
        try:
            self._emit(self._generate())
            return self._outcome("completed")
        except GenerationCancelled:
            logger.info("Generation cancelled by the client after %d steps", self._steps_completed)
            return self._outcome("cancelled")
        except Exception as error:  # noqa: BLE001 - any failure must reach the client as its catalog error
            failure = classify(error, fallback=GenerationFailed, probe=self._probe)
            if failure is error:
                logger.warning("Generation failed: %s", error)
            else:
                logger.error("Generation failed (%s)", failure.error_type, exc_info=error)
            return self._outcome("failed", failure)

    def _with_fatal_preview_failure(self, outcome: RunOutcome) -> RunOutcome:
        """A device error in the preview path ends the replica even when the run ended otherwise first
        (cancelled by the client, or failed for a recoverable reason)."""
        failure = self._classified_preview_error()
        if failure is None or not failure.fatal or (outcome.error is not None and outcome.error.fatal):
            return outcome
        return self._outcome("failed", failure)

    def _preview_wait_s(self) -> float:
        """How long to wait for a preview decode before taking the device for hung: the request's own
        time limit (none for the warm-up, which may compile for minutes)."""
        return 0.0 if self._preview_failure is not None else self._timeout_s  # hung already: no second wait

    def _outcome(self, status: RunStatus, error: ServiceError | None = None) -> RunOutcome:
        return RunOutcome(status, self._steps_completed, self._clock.denoise_seconds(), error)

    def _generate(self) -> UnencodedFinal:
        request = self._request
        pipeline = self._models.for_task(request.task)
        started = time.perf_counter()
        self._clock.start()
        self._deadline = started + self._timeout_s
        generators = batch_generators(request.seed, request.num_images)
        with torch.inference_mode():
            with vae_dtype_restored(pipeline.vae):
                output = pipeline(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    num_inference_steps=request.num_inference_steps,
                    guidance_scale=request.guidance_scale,
                    num_images_per_prompt=request.num_images,
                    generator=generators,
                    output_type="pt",  # checked for NaNs before it becomes an image
                    callback_on_step_end=self._on_step_end,
                    **self._task_inputs,
                )
            images = output.images
            if not torch.isfinite(images).all():
                raise GenerationFailed("the generated image contains NaN or infinite values")
            pixels, has_nsfw_concepts = self._safety_checked(final_pixels(images))
            host_pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # the one copy to the host, 8-bit
        inference_s = time.perf_counter() - started
        if self._cancelled.is_set():  # the client left during the final decode: nobody to send it to
            raise GenerationCancelled
        if not self._previews.drain(self._preview_wait_s()):  # every preview reaches the client before the final
            self._preview_failure = preview_hung(self._timeout_s)
            raise self._preview_failure
        self._check_preview_error()
        return UnencodedFinal(
            pixels=list(host_pixels),
            request=request,
            has_nsfw_concepts=has_nsfw_concepts,
            inference_s=inference_s,
            started=started,
            jpeg_quality=self._final_jpeg_quality,
        )

    def _safety_checked(self, images: torch.Tensor) -> tuple[torch.Tensor, list[bool | None]]:
        """The 8-bit images, flagged ones blacked out, and a flag per image; None per image when nothing was
        checked (no checker configured, or the request turned it off): no claim about a check not run."""
        checker = self._models.safety_checker
        if checker is None or not self._request.enable_safety_checker:
            return images, [None] * len(images)
        checked, flagged = checker.check(images)
        return checked, list(flagged)

    def _on_step_end(self, pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.last_progress = time.monotonic()
        self._steps_completed = step + 1
        self._clock.step_ended()
        if self._cancelled.is_set():
            raise GenerationCancelled
        if time.perf_counter() > self._deadline:
            raise DeadlineExceeded(f"the request ran past its {self._timeout_s:g} s time limit at step {step}")
        self._check_preview_error()
        if self._progress:
            self._emit(ProgressEvent(step=step, num_inference_steps=self._request.denoising_steps))
        if self._schedule.is_preview_step(step):
            request = PreviewRequest(
                step=step,
                num_inference_steps=self._request.denoising_steps,
                latents=callback_kwargs["latents"],
                deliver=self._deliver_preview,
                fail=self._record_preview_error,
            )
            self._previews.submit(request)
        return {}

    def _deliver_preview(self, event: PreviewEvent) -> None:
        self.last_progress = time.monotonic()
        if self._on_first_preview is not None:
            self._on_first_preview()
            self._on_first_preview = None
        self._emit(event)

    def _record_preview_error(self, error: BaseException) -> None:
        """The preview worker's report (its thread, or this one on a CPU), kept as raised: it is classified
        on the pipeline thread, which probes the device, so a device error in the preview path is a
        device error."""
        if self._preview_error is None:
            self._preview_error = error

    def _classified_preview_error(self) -> ServiceError | None:
        """The preview path's failure as a catalog error (once; call on the pipeline thread), or None."""
        error = self._preview_error
        if self._preview_failure is None and error is not None:
            failure = classify(error, fallback=PreviewFailed, probe=self._probe)
            if failure is not error:
                failure.__cause__ = error
            self._preview_failure = failure
        return self._preview_failure

    def _check_preview_error(self) -> None:
        if (failure := self._classified_preview_error()) is not None:
            raise failure

    def _emit(self, event: RunEvent | None) -> None:
        if self._cancelled.is_set() and event is not END_OF_STREAM:
            return
        self._on_event(event)


class PreviewFailed(GenerationFailed):
    """A `generation_failed` whose message says where: the preview decoder."""

    default_detail = "the generation failed: preview decoding failed"


def preview_hung(waited_s: float) -> DeviceError:
    """A preview decode that never returned: the device is hung, which is as fatal as a dead one."""
    logger.error("A preview decode did not finish within %g s: taking the device for hung", waited_s)
    return DeviceError()


def batch_generators(seed: int, num_images: int) -> list[torch.Generator]:
    """One CPU generator per image of a batch, image i's seeded `seed + i`. diffusers draws each image's
    noise from its own generator in a list, on the generator's device, then moves it to the pipeline's:
    so a seed is the same starting noise on the CPU and on every GPU model (CUDA's generator draws other
    numbers), as diffusers advises for reproducibility. A seed reproduces its batch, and image i's
    starting noise is a single-image request's with seed `seed + i`."""
    return [torch.Generator(device="cpu").manual_seed(seed + index) for index in range(num_images)]


def _threadsafe_put(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> EventSink:
    def put(event: StreamEvent | None) -> None:
        # A closed loop means the replica is shutting down and nobody is listening.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(events.put_nowait, event)

    return put


@contextlib.contextmanager
def vae_dtype_restored(vae: torch.nn.Module) -> Iterator[None]:
    """Put the VAE back in its dtype after the pipeline call, whatever happened.

    SDXL's pipeline upcasts a float16 VAE whose config says `force_upcast` to float32 for the final
    decode and casts it back only when the decode returns: after a failed decode every later one
    would fail on a Half/Float mismatch. If the cast back fails too, the replica cannot serve again.
    """
    dtype = vae.dtype
    try:
        yield
    finally:
        if vae.dtype != dtype:
            try:
                vae.to(dtype=dtype)
            except Exception as error:
                raise DeviceError(f"the VAE could not be cast back to {dtype}: {error}") from error
