"""A replica's preview worker: renders previews off the denoising loop, one class per device.

Both kinds hand each preview to one daemon thread that encodes it (JPEG, base64) while denoising
goes on. If that thread falls behind, a newer preview replaces the one still waiting (stale
previews are dropped, never queued), so a slow encoder can neither stall nor flood a stream. They
differ in where the TAESD decode runs; `start_preview_worker` picks one at replica start:

- `CudaPreviewWorker`: the loop only hands over a copy of the latents. The decode runs on a side
  CUDA stream and its pixels reach pinned host memory by a non-blocking copy, all overlapping
  denoising.
- `CpuPreviewWorker`: there is no idle hardware to overlap with (a second decode thread only fights
  the loop's OpenMP threads for the same cores), so the small decode runs in the loop and only the
  encoding moves to the thread.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deployments.previews import decode_latents, encode_image, latents_to_pixels, pixels_to_image
from serve_app.contract.events import PreviewEvent

logger = logging.getLogger(__name__)

PixelSource = Callable[[], torch.Tensor]  # called on the worker's thread: uint8 HWC pixels on the CPU


@dataclass(frozen=True)
class PreviewSettings:
    max_size: int
    jpeg_quality: int


@dataclass(frozen=True)
class PreviewRequest:
    """What a run hands over at a preview step. `latents` is the pipeline's own tensor, to be read
    during `submit` only; `deliver` gets the event, `fail` the exception if rendering fails."""

    step: int
    num_inference_steps: int
    latents: torch.Tensor
    deliver: Callable[[PreviewEvent], None]
    fail: Callable[[BaseException], None]


@dataclass(frozen=True)
class _PendingPreview:
    request: PreviewRequest  # its `latents` are not read again: `pixels` holds what the thread needs
    pixels: PixelSource
    seconds_in_loop: float


class PreviewWorker(ABC):
    """One encoder thread behind `submit` / `drain` / `discard`; subclasses say where the decode runs."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        settings: PreviewSettings,
        on_rendered: Callable[[float], None] | None = None,
    ) -> None:
        self._decoder = decoder
        self._settings = settings
        self._on_rendered = on_rendered  # gets each render's seconds, in the loop and on the thread (metrics)
        self._condition = threading.Condition()
        self._pending: _PendingPreview | None = None
        self._busy = False
        self.dropped = 0  # previews replaced before they were rendered
        self._thread = threading.Thread(target=self._serve_forever, name="preview-encoder", daemon=True)
        self._thread.start()

    def submit(self, request: PreviewRequest) -> None:
        """Called in the denoising loop (the step callback); never waits for the encoder thread."""
        started = time.perf_counter()
        try:
            pixels = self._hand_over(request.latents)
        except Exception as error:  # noqa: BLE001 - reported to the run, which ends the stream
            logger.exception("Preview for step %d failed", request.step)
            request.fail(error)
            return
        pending = _PendingPreview(request, pixels, time.perf_counter() - started)
        with self._condition:
            if self._pending is not None:
                self.dropped += 1
            self._pending = pending
            self._condition.notify_all()

    def drain(self, timeout_s: float = math.inf) -> bool:
        """Wait until every submitted preview has been delivered (or failed); False if that took longer
        than `timeout_s` (a decode that never returns: a hung device)."""
        with self._condition:
            return self._condition.wait_for(lambda: self._pending is None and not self._busy, _bounded(timeout_s))

    def discard(self, timeout_s: float = math.inf) -> bool:
        """Forget a waiting preview and wait for the one being rendered, if any; False past `timeout_s`."""
        with self._condition:
            self._pending = None
            return self._condition.wait_for(lambda: not self._busy, _bounded(timeout_s))

    @abstractmethod
    def _hand_over(self, latents: torch.Tensor) -> PixelSource:
        """In the loop: whatever must happen before the loop goes on; returns what the thread calls for the pixels."""

    def _serve_forever(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending is not None)
                pending, self._pending, self._busy = self._pending, None, True
            request = pending.request
            try:
                started = time.perf_counter()
                image = pixels_to_image(pending.pixels(), self._settings.max_size)
                event = PreviewEvent(
                    step=request.step,
                    num_inference_steps=request.num_inference_steps,
                    image=encode_image(image, "jpeg", self._settings.jpeg_quality),
                )
                if self._on_rendered is not None:
                    self._on_rendered(pending.seconds_in_loop + time.perf_counter() - started)
                request.deliver(event)
            except BaseException as error:  # noqa: BLE001 - reported to the run, which ends the stream
                logger.exception("Preview for step %d failed", request.step)
                try:
                    request.fail(error)
                except BaseException:  # noqa: BLE001 - this thread must outlive a failure in reporting one
                    logger.exception("Reporting the failed preview for step %d failed too", request.step)
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()


class CpuPreviewWorker(PreviewWorker):
    """Decodes in the loop (nothing idle to overlap with on a CPU); the thread only encodes."""

    def _hand_over(self, latents: torch.Tensor) -> PixelSource:
        with torch.inference_mode():
            pixels = latents_to_pixels(self._decoder, latents, self._settings.max_size)
        return lambda: pixels


class CudaPreviewWorker(PreviewWorker):
    """Copies the latents in the loop; decodes on a side CUDA stream on the thread."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        settings: PreviewSettings,
        on_rendered: Callable[[float], None] | None = None,
    ) -> None:
        self._stream = torch.cuda.Stream(device=decoder.device)
        super().__init__(decoder, settings, on_rendered)

    def _hand_over(self, latents: torch.Tensor) -> PixelSource:
        # `scheduler.step` returns new latents rather than updating them in place, so the copy is
        # cheap insurance: a scheduler or callback that did write in place would change a waiting preview.
        copy = latents[:1].detach().clone()
        ready = torch.cuda.Event()
        ready.record()  # on the loop's stream, after the copy: the side stream waits for it, the loop does not
        return functools.partial(self._decode_on_side_stream, copy, ready)

    def _decode_on_side_stream(self, latents: torch.Tensor, ready: torch.cuda.Event) -> torch.Tensor:
        """Decode after the step that made the latents, then copy to pinned host memory without blocking
        the stream; only this thread waits for the copy, never the denoising loop."""
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            # Allocated on the loop's stream, read on this one: keep the allocator from handing the memory
            # back to the loop while this stream's kernels may still read it (a decode failing after launch).
            latents.record_stream(self._stream)
            on_device = decode_latents(self._decoder, latents, self._settings.max_size)
            pixels = torch.empty(on_device.shape, dtype=torch.uint8, pin_memory=True)
            pixels.copy_(on_device, non_blocking=True)
            copied = self._stream.record_event(torch.cuda.Event(blocking=True))  # sleeps; a spin would hold a core
        copied.synchronize()
        return pixels


def _bounded(timeout_s: float) -> float | None:
    """`Condition.wait_for`'s timeout: None for no bound (it rejects infinity)."""
    return None if math.isinf(timeout_s) else max(0.0, timeout_s)


def start_preview_worker(
    decoder: torch.nn.Module,
    settings: PreviewSettings,
    on_rendered: Callable[[float], None] | None = None,
) -> PreviewWorker:
    """The worker for the decoder's device, chosen once, at replica start."""
    worker_class = CudaPreviewWorker if decoder.device.type == "cuda" else CpuPreviewWorker
    return worker_class(decoder, settings, on_rendered)
