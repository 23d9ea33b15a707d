"""The SDXL engine in-process: error events, and whether the device stays usable after a failure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deployments.engine import SDXLEngine
from serve_app.config import AppConfig
from serve_app.schemas import GenerationRequest

REQUEST = GenerationRequest(prompt="a red fox", num_inference_steps=3, width=128, height=128, seed=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> SDXLEngine:
    cache = tmp_path_factory.mktemp("cache")
    return SDXLEngine(AppConfig(model="tiny", device="cpu", cache_dir=str(cache), warmup_size=128))


def collect(engine: SDXLEngine, request: GenerationRequest = REQUEST, previews: bool = True) -> list[dict]:
    async def run() -> list[dict]:
        return [event.model_dump() async for event in engine.generate(request, previews)]

    return asyncio.run(run())


def failing_unet(engine: SDXLEngine, error: Exception):
    unet = engine.models.pipeline.unet
    original = unet.forward

    def forward(*args, **kwargs):
        raise error

    unet.forward = forward
    return lambda: setattr(unet, "forward", original)


def test_success_leaves_the_slot_free(engine: SDXLEngine) -> None:
    events = collect(engine)
    assert [event["type"] for event in events] == ["preview", "final"]
    assert not engine.busy


def test_ordinary_exception_is_an_error_event_and_device_stays_usable(engine: SDXLEngine) -> None:
    restore = failing_unet(engine, ValueError("bad shapes"))
    try:
        events = collect(engine)
    finally:
        restore()
    assert events == [{"type": "error", "detail": "ValueError: bad shapes", "error_type": "generation_failed"}]
    engine.check_device()  # does not raise
    assert [event["type"] for event in collect(engine)] == ["preview", "final"]


def test_device_error_makes_the_device_unusable(tmp_path: Path) -> None:
    """A fake: a real fatal CUDA error needs a GPU, so the UNet raises the error CUDA would."""
    engine = SDXLEngine(AppConfig(model="tiny", device="cpu", cache_dir=str(tmp_path)))
    failing_unet(engine, RuntimeError("CUDA error: an illegal memory access was encountered"))
    events = collect(engine, previews=False)
    assert [event["error_type"] for event in events] == ["device_error"]
    with pytest.raises(RuntimeError, match="unusable"):
        engine.check_device()  # the deployment's health check: Serve replaces the replica


def test_cublas_allocation_failure_is_out_of_memory_not_a_dead_device(tmp_path: Path) -> None:
    """cuBLAS reports running out of memory as a CUDA error; the device is still usable after it."""
    engine = SDXLEngine(AppConfig(model="tiny", device="cpu", cache_dir=str(tmp_path)))
    failing_unet(engine, RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    events = collect(engine, previews=False)
    assert [event["error_type"] for event in events] == ["out_of_memory"]
    engine.check_device()  # does not raise: Serve keeps the replica
