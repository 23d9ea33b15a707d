"""A replica's preview encoder: decodes and encodes previews off the denoising loop.

On a GPU the loop only hands over a copy of the latents: the TAESD decode runs on a side CUDA
stream, its pixels reach pinned host memory by a non-blocking copy, and the JPEG/base64 encoding
runs on this worker's thread, all overlapping denoising. On a CPU there is no idle hardware to
overlap with (a second decode thread only fights the loop's OpenMP threads for the same cores),
so the small TAESD decode runs in the loop and only the encoding moves here. If the worker falls
behind, a newer preview replaces the one still waiting (stale previews are dropped, never queued),
so a slow encoder can neither stall nor flood a stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deployments.previews import decode_latents, encode_image, latents_to_pixels, pixels_to_image
from serve_app.schemas import PreviewEvent

logger = logging.getLogger(__name__)


@dataclass
class PreviewJob:
    """One preview to render; `deliver` gets the event, `fail` the exception if rendering fails."""

    step: int
    num_inference_steps: int
    latents: torch.Tensor
    deliver: Callable[[PreviewEvent], None]
    fail: Callable[[BaseException], None]
    ready: torch.cuda.Event | None = None  # recorded after the copy on the producing CUDA stream
    pixels: torch.Tensor | None = None  # already decoded (CPU): the worker only encodes
    decode_seconds: float = 0.0


@dataclass(frozen=True)
class PreviewSettings:
    max_size: int
    jpeg_quality: int


class PreviewWorker:
    """Owns one daemon thread. On a GPU `submit` only hands over the job; on a CPU it decodes in the
    caller's thread first (see the module docstring) and hands over the encoding."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        settings: PreviewSettings,
        on_rendered: Callable[[float], None] | None = None,
    ) -> None:
        self._decoder = decoder
        self._on_rendered = on_rendered  # gets each render's seconds (metrics)
        self._settings = settings
        self._condition = threading.Condition()
        self._pending: PreviewJob | None = None
        self._busy = False
        self.dropped = 0  # previews replaced before they were rendered
        on_cuda = decoder.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=decoder.device) if on_cuda else None
        self._thread = threading.Thread(target=self._serve_forever, name="preview-encoder", daemon=True)
        self._thread.start()

    def submit(self, job: PreviewJob) -> None:
        if self._stream is None:  # CPU: decode here, in the loop (see the module docstring)
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    job.pixels = latents_to_pixels(self._decoder, job.latents)
            except Exception as error:  # noqa: BLE001 - reported to the run, which ends the stream
                logger.exception("Preview for step %d failed", job.step)
                job.fail(error)
                return
            job.decode_seconds = time.perf_counter() - started
        with self._condition:
            if self._pending is not None:
                self.dropped += 1
            self._pending = job
            self._condition.notify_all()

    def drain(self) -> None:
        """Wait until every submitted preview has been delivered (or failed)."""
        with self._condition:
            self._condition.wait_for(lambda: self._pending is None and not self._busy)

    def discard(self) -> None:
        """Forget a waiting preview and wait for the one being rendered, if any."""
        with self._condition:
            self._pending = None
            self._condition.wait_for(lambda: not self._busy)

    def _serve_forever(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending is not None)
                job, self._pending, self._busy = self._pending, None, True
            try:
                started = time.perf_counter()
                event = self.render(job)
                if self._on_rendered is not None:
                    self._on_rendered(job.decode_seconds + time.perf_counter() - started)
                job.deliver(event)
            except BaseException as error:  # noqa: BLE001 - reported to the run, which ends the stream
                logger.exception("Preview for step %d failed", job.step)
                job.fail(error)
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()

    def _decode_on_side_stream(self, job: PreviewJob) -> torch.Tensor:
        """Decode after the step that made the latents, then copy to pinned host memory without blocking
        the stream; only this worker thread waits for the copy, never the denoising loop."""
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            if job.ready is not None:
                self._stream.wait_event(job.ready)
            on_device = decode_latents(self._decoder, job.latents)
            pixels = torch.empty(on_device.shape, dtype=torch.uint8, pin_memory=True)
            pixels.copy_(on_device, non_blocking=True)
            copied = self._stream.record_event(torch.cuda.Event(blocking=True))  # sleeps; a spin would hold a core
        copied.synchronize()
        return pixels

    def render(self, job: PreviewJob) -> PreviewEvent:
        """Decode on a side CUDA stream (GPU) unless decoded already (CPU), then encode."""
        pixels = job.pixels
        if pixels is None:
            pixels = self._decode_on_side_stream(job)
        image = pixels_to_image(pixels, self._settings.max_size)
        return PreviewEvent(
            step=job.step,
            num_inference_steps=job.num_inference_steps,
            image=encode_image(image, "jpeg", self._settings.jpeg_quality),
        )
