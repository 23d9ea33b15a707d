"""torch's exceptions as catalog errors, where the model replica catches them (its pipeline thread).
The exception's text is logged there; the client reads the catalog's message.

Whether the device survived is decided by probing it, not by the message: a CUDA error a request can
cause (a launch configuration too large for one kernel) leaves the context usable, while a dead one
(an illegal memory access, cuDNN's EXECUTION_FAILED, an error from inside a Triton kernel) is worded
in many ways but fails every later call, a tiny synchronized computation included.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from serve_app.contract.errors import DeviceError, GenerationFailed, OutOfMemory, ServiceError

# `torch.OutOfMemoryError` exists from torch 2.5; `torch.cuda.OutOfMemoryError` before it.
TORCH_OUT_OF_MEMORY: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)} - {None}
)
OUT_OF_MEMORY_SIGNS = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory", "CUDA out of memory")

DeviceProbe = Callable[[], None]  # raises when the device can no longer compute
PROBE_TIMEOUT_S = 10.0  # a tiny computation queued behind a failed run's kernels: longer means hung


def device_probe(device: torch.device) -> DeviceProbe | None:
    """A probe for `device`, to call on the thread that drives it; None for the CPU (nothing to lose)."""
    if device.type != "cuda":
        return None

    def probe() -> None:
        # Queued behind whatever the failed run left on the stream; polled, never waited on without a bound:
        # a hung device must fail the probe, not hang the thread that runs it. A sticky error from an earlier
        # kernel surfaces in `query`.
        total = torch.ones(64, device=device).sum()
        done = torch.cuda.Event()
        done.record()
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while not done.query():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the device did not finish a tiny computation within {PROBE_TIMEOUT_S:g} s")
            time.sleep(0.005)
        if total.item() != 64:
            raise RuntimeError(f"the device computed 64 ones as {total.item()}")

    return probe


def classify(
    error: BaseException, fallback: type[ServiceError] = GenerationFailed, probe: DeviceProbe | None = None
) -> ServiceError:
    """A catalog error for what the pipeline raised: ours as it is; out-of-memory first (cuBLAS and some
    kernels report it as a generic CUDA error, and the device survives it); then, with a `probe` (a GPU),
    the fatal `device_error` when the device fails the probe; the rest as `fallback`."""
    if isinstance(error, ServiceError):
        return error
    message = str(error)
    if isinstance(error, TORCH_OUT_OF_MEMORY) or any(sign in message for sign in OUT_OF_MEMORY_SIGNS):
        return OutOfMemory()
    if probe is not None and not survived(probe):
        return DeviceError()
    return fallback()


def survived(probe: DeviceProbe) -> bool:
    try:
        probe()
    except Exception:  # noqa: BLE001 - any failure of a tiny synchronized computation means a dead context
        return False
    return True
