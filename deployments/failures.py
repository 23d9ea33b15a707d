"""torch's exceptions as catalog errors, where the model replica catches them (its pipeline and
preview threads). The exception's text is logged there; the client reads the catalog's message."""

from __future__ import annotations

import torch

from serve_app.contract.errors import DeviceError, GenerationFailed, OutOfMemory, ServiceError

# `torch.OutOfMemoryError` exists from torch 2.5; `torch.cuda.OutOfMemoryError` before it.
TORCH_OUT_OF_MEMORY: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)} - {None}
)
ACCELERATOR_ERRORS: tuple[type[BaseException], ...] = tuple({getattr(torch, "AcceleratorError", None)} - {None})
OUT_OF_MEMORY_SIGNS = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory", "CUDA out of memory")


def classify(error: BaseException, fallback: type[ServiceError] = GenerationFailed) -> ServiceError:
    """A catalog error for what the pipeline raised: ours as it is; out-of-memory first (cuBLAS and some
    kernels report it as a generic CUDA error); a dead CUDA context as the fatal `device_error`; the
    rest as `fallback`."""
    if isinstance(error, ServiceError):
        return error
    message = str(error)
    if isinstance(error, TORCH_OUT_OF_MEMORY) or any(sign in message for sign in OUT_OF_MEMORY_SIGNS):
        return OutOfMemory()
    if isinstance(error, ACCELERATOR_ERRORS) or (isinstance(error, RuntimeError) and "CUDA error" in message):
        return DeviceError()
    return fallback()
