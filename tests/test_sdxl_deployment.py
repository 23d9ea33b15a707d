"""The SDXL deployment class in-process: error events and health after a device failure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deployments.sdxl import SDXLDeployment
from serve_app.config import AppConfig

REQUEST = {"prompt": "a red fox", "num_inference_steps": 3, "width": 128, "height": 128, "seed": 0}


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    return SDXLDeployment.func_or_class(AppConfig(model="tiny", device="cpu", cache_dir=str(cache), warmup_size=128))


def collect(replica, request: dict = REQUEST, previews: bool = True) -> list[dict]:
    async def run() -> list[dict]:
        return [event async for event in replica.generate(request, previews)]

    return asyncio.run(run())


def failing_unet(replica, error: Exception):
    unet = replica._models.pipeline.unet
    original = unet.forward

    def forward(*args, **kwargs):
        raise error

    unet.forward = forward
    return lambda: setattr(unet, "forward", original)


def test_success_then_stats(replica) -> None:
    events = collect(replica)
    assert [event["type"] for event in events] == ["preview", "final"]
    stats = replica.stats()
    assert stats["outcomes"]["completed"] >= 1 and not stats["busy"]


def test_ordinary_exception_is_an_error_event_and_replica_stays_healthy(replica) -> None:
    restore = failing_unet(replica, ValueError("bad shapes"))
    try:
        events = collect(replica)
    finally:
        restore()
    assert events == [{"type": "error", "detail": "ValueError: bad shapes", "error_type": "generation_failed"}]
    replica.check_health()  # does not raise
    assert [event["type"] for event in collect(replica)] == ["preview", "final"]


def test_device_error_makes_the_replica_unhealthy(tmp_path: Path) -> None:
    """A fake: a real fatal CUDA error needs a GPU, so the UNet raises the error CUDA would."""
    replica = SDXLDeployment.func_or_class(AppConfig(model="tiny", device="cpu", cache_dir=str(tmp_path)))
    failing_unet(replica, RuntimeError("CUDA error: an illegal memory access was encountered"))
    events = collect(replica, previews=False)
    assert [event["error_type"] for event in events] == ["device_error"]
    with pytest.raises(RuntimeError, match="unusable"):
        replica.check_health()  # Serve replaces a replica whose health check raises


def test_cublas_allocation_failure_is_out_of_memory_not_a_dead_device(tmp_path: Path) -> None:
    """cuBLAS reports running out of memory as a CUDA error; the device is still usable after it."""
    replica = SDXLDeployment.func_or_class(AppConfig(model="tiny", device="cpu", cache_dir=str(tmp_path)))
    failing_unet(replica, RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    events = collect(replica, previews=False)
    assert [event["error_type"] for event in events] == ["out_of_memory"]
    replica.check_health()  # does not raise: Serve keeps the replica
