"""When denoising steps end as the device ran them, not as the CPU queued them.

The pipeline's step callback runs once a step's kernels are queued; on CUDA the device may still be a
step behind, so a wall clock read there measures launches. CUDA events recorded on the stream at each
step's end time the steps as they completed; they are read once, after the run, when the stream has
long passed them. On the CPU the callback runs after the step's work, and a wall clock is exact.
"""

from __future__ import annotations

import time

import torch


class StepClock:
    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._started = 0.0
        self._last_step = 0.0
        self._start_event: torch.cuda.Event | None = None
        self._step_event: torch.cuda.Event | None = None

    def start(self) -> None:
        self._started = self._last_step = time.perf_counter()
        if self._cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def step_ended(self) -> None:
        self._last_step = time.perf_counter()
        if self._cuda:
            self._step_event = torch.cuda.Event(enable_timing=True)
            self._step_event.record()

    def denoise_seconds(self) -> float:
        """Seconds from the start to the end of the last step, as the device ran them. Never waits: a step
        the device has not finished (a failed or hung run), or a device that fails to answer, gives the wall
        clock's figure; after a completed run the device is long past it."""
        wall = self._last_step - self._started
        if self._start_event is None or self._step_event is None:
            return wall
        try:
            if not self._step_event.query():
                return wall
            return self._start_event.elapsed_time(self._step_event) / 1000
        except RuntimeError:  # a failed device: the run's error says so; the metric only needs a number
            return wall
