"""The SDXL engine in-process: failures as catalog errors, whether the device stays usable after a
failure, and health checks that never hold up a streaming run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from deployments import engine as engine_module
from deployments import preview_worker, sdxl
from deployments.engine import EngineConfig, SDXLEngine
from deployments.pipeline_run import GenerationRun, RunOutcome
from deployments.sdxl import SDXLDeployment
from serve_app.contract.errors import ReplicaFailed
from serve_app.contract.events import STREAM, RunMode
from tests.tiny_engine import collect, resolved, tiny_config, tiny_engine

REQUEST = resolved(num_inference_steps=3, width=128, height=128, seed=0)
ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def engine(cache: Path) -> SDXLEngine:
    return tiny_engine(cache, model={"warmup_size": 128})


class FakeGpuProbe:
    """Stands in for `deployments.failures.device_probe` on a GPU (none here): `dead` fails the probe as a
    lost CUDA context fails every call; records the thread each probe ran on."""

    def __init__(self, dead: bool) -> None:
        self.dead = dead
        self.threads: list[str] = []

    def __call__(self) -> None:
        self.threads.append(threading.current_thread().name)
        if self.dead:
            raise RuntimeError(ILLEGAL_ADDRESS)


@pytest.fixture
def dead_device(monkeypatch: pytest.MonkeyPatch) -> FakeGpuProbe:
    """Engines built in this test run on a (faked) GPU whose context is lost once anything fails."""
    probe = FakeGpuProbe(dead=True)
    monkeypatch.setattr(engine_module, "device_probe", lambda device: probe)
    return probe


@pytest.fixture
def healthy_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpuProbe:
    probe = FakeGpuProbe(dead=False)
    monkeypatch.setattr(engine_module, "device_probe", lambda device: probe)
    return probe


def raising(error: Exception):
    def fail(*args, **kwargs):
        raise error

    return fail


def failing_unet(engine: SDXLEngine, error: Exception):
    unet = engine.models.pipeline.unet
    original = unet.forward
    unet.forward = raising(error)
    return lambda: setattr(unet, "forward", original)


def test_success_leaves_the_slot_free(engine: SDXLEngine) -> None:
    events = collect(engine, REQUEST)
    assert [event["type"] for event in events] == ["preview", "final"]
    assert not engine.busy


def test_ordinary_exception_is_generation_failed_and_device_stays_usable(
    engine: SDXLEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """The client reads the catalog's message; the exception's text goes to the log."""
    restore = failing_unet(engine, ValueError("bad shapes at /srv/secret/path"))
    try:
        events = collect(engine, REQUEST)
    finally:
        restore()
    assert events == [{"type": "error", "detail": "the generation failed", "error_type": "generation_failed"}]
    assert "bad shapes at /srv/secret/path" in caplog.text
    engine.check_device()  # does not raise
    assert [event["type"] for event in collect(engine, REQUEST)] == ["preview", "final"]


def test_device_error_makes_the_device_unusable(cache: Path, dead_device: FakeGpuProbe) -> None:
    """A fake: a real fatal CUDA error needs a GPU, so the UNet raises the error CUDA would."""
    engine = tiny_engine(cache)
    failing_unet(engine, RuntimeError(ILLEGAL_ADDRESS))
    events = collect(engine, REQUEST, previews=False)
    assert [event["error_type"] for event in events] == ["device_error"]
    with pytest.raises(RuntimeError, match="unusable"):
        engine.check_device()  # the deployment's health check: Serve replaces the replica


def test_after_a_device_error_the_engine_refuses_at_once_as_retryable_and_leaves_service(
    cache: Path, dead_device: FakeGpuProbe
) -> None:
    """The deployment is told once (it exits so Serve replaces it now), and every later request fails
    at once as `replica_failed`, which the relay and the job queue retry on another replica, instead of
    each meeting a 500 here until the health check notices."""
    left: list[int] = []
    engine = SDXLEngine(EngineConfig.of(tiny_config(cache)), on_unusable=lambda: left.append(1))
    restore = failing_unet(engine, RuntimeError(ILLEGAL_ADDRESS))
    assert [event["error_type"] for event in collect(engine, REQUEST, previews=False)] == ["device_error"]
    restore()  # the UNet would work again: the engine must not try it
    later = collect(engine, REQUEST, previews=False)
    assert [event["error_type"] for event in later] == ["replica_failed"] and left == [1]
    assert ReplicaFailed.retryable and not engine.busy


def test_a_preview_that_never_finishes_is_a_hung_device_not_a_hung_replica(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode or encode that never returns (a hung GPU) holds the preview thread: the run waits for it
    no longer than its time limit, ends as `device_error`, and the engine leaves service."""
    release = threading.Event()

    def hangs(*args, **kwargs):
        release.wait(60)
        raise RuntimeError("released by the test")

    left: list[int] = []
    engine = SDXLEngine(
        EngineConfig.of(tiny_config(cache, requests={"timeout_s": 2})), on_unusable=lambda: left.append(1)
    )
    monkeypatch.setattr(preview_worker, "pixels_to_image", hangs)
    try:
        events = collect(engine, REQUEST)
    finally:
        release.set()
    assert events[-1]["error_type"] == "device_error" and left == [1]
    assert not engine.busy


def test_the_deployment_exits_a_moment_after_its_device_failed(
    cache: Path, monkeypatch: pytest.MonkeyPatch, dead_device: FakeGpuProbe
) -> None:
    """The replica process ends itself (Serve then starts another) once the failed run's error event
    had time to reach its caller; the exit is recorded here instead of killing the test."""
    exits: list[int] = []
    monkeypatch.setattr(sdxl.os, "_exit", exits.append)
    deployment = SDXLDeployment.func_or_class.__new__(SDXLDeployment.func_or_class)
    deployment._engine = SDXLEngine(EngineConfig.of(tiny_config(cache)), on_unusable=deployment._leave_service)
    failing_unet(deployment._engine, RuntimeError(ILLEGAL_ADDRESS))

    async def fail_then_wait() -> tuple[list[str], list[int]]:
        errors = [event.error_type async for event in deployment.generate(REQUEST, STREAM) if event.type == "error"]
        before = list(exits)
        await asyncio.sleep(sdxl.EXIT_AFTER_FATAL_S + 0.5)
        return errors, before

    errors, before = asyncio.run(fail_then_wait())
    assert errors == ["device_error"] and before == [] and exits == [sdxl.EXIT_CODE_DEVICE_LOST]


def test_the_watchdog_fails_health_when_a_run_makes_no_progress(cache: Path) -> None:
    """A kernel that never returns (faked: the UNet blocks) sends no step and no preview: past
    `model.watchdog_s` the health check fails and the replica leaves service, rather than hold the slot
    for ever while looking healthy."""
    left: list[int] = []
    config = EngineConfig.of(tiny_config(cache, model={"watchdog_s": 0.5}))
    engine = SDXLEngine(config, on_unusable=lambda: left.append(1))
    release = threading.Event()
    forward = engine.models.pipeline.unet.forward

    def hangs(*args, **kwargs):
        release.wait(30)
        return forward(*args, **kwargs)

    engine.models.pipeline.unet.forward = hangs

    async def scenario() -> tuple[str | None, str | None]:
        run = asyncio.ensure_future(asyncio.to_thread(collect, engine, REQUEST))
        await asyncio.sleep(0.2)
        early = None
        try:
            await asyncio.to_thread(engine.check_device)  # within the bound: healthy
        except RuntimeError as error:
            early = str(error)
        await asyncio.sleep(1.0)
        late = None
        try:
            await asyncio.to_thread(engine.check_device)
        except RuntimeError as error:
            late = str(error)
        release.set()
        await run
        return early, late

    early, late = asyncio.run(scenario())
    assert early is None and late is not None and "hung" in late and left == [1]
    assert [event["error_type"] for event in collect(engine, REQUEST)] == ["replica_failed"]


@pytest.mark.parametrize(
    "message",
    ["CUDA error: too many resources requested for launch", "CUDA error: invalid configuration argument"],
)
def test_a_cuda_error_the_device_survives_fails_only_that_request(
    cache: Path, healthy_gpu: FakeGpuProbe, message: str
) -> None:
    """A request can cause a CUDA error (a launch too large for one kernel) without harming the device:
    the probe, run on the pipeline thread, finds it computing, so only that request fails and the
    replica stays in service. Matching "CUDA error" in the message took the replica out."""
    engine = tiny_engine(cache)
    restore = failing_unet(engine, RuntimeError(message))
    events = collect(engine, REQUEST, previews=False)
    restore()
    assert [event["error_type"] for event in events] == ["generation_failed"]
    assert healthy_gpu.threads and all(name.startswith("sdxl-pipeline") for name in healthy_gpu.threads)
    engine.check_device()  # does not raise: Serve keeps the replica
    assert [event["type"] for event in collect(engine, REQUEST, previews=False)] == ["final"]


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
        RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
        ValueError("anything at all"),
    ],
)
def test_a_dead_device_is_found_by_its_probe_however_the_error_is_worded(
    cache: Path, dead_device: FakeGpuProbe, error: Exception
) -> None:
    engine = tiny_engine(cache)
    failing_unet(engine, error)
    assert [event["error_type"] for event in collect(engine, REQUEST, previews=False)] == ["device_error"]
    assert not engine.usable


def test_cublas_allocation_failure_is_out_of_memory_not_a_dead_device(cache: Path) -> None:
    """cuBLAS reports running out of memory as a CUDA error; the device is still usable after it."""
    engine = tiny_engine(cache)
    failing_unet(engine, RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    events = collect(engine, REQUEST, previews=False)
    assert [event["error_type"] for event in events] == ["out_of_memory"]
    engine.check_device()  # does not raise: Serve keeps the replica


def test_device_error_in_the_preview_path_makes_the_device_unusable(cache: Path, dead_device: FakeGpuProbe) -> None:
    """A fake, as above, raised by the preview decoder: the preview worker hands the run the original
    exception, which is classified like any other, not as a generic preview failure."""
    engine = tiny_engine(cache)
    engine.models.preview_decoder.decode = raising(RuntimeError(ILLEGAL_ADDRESS))
    events = collect(engine, REQUEST)
    assert [event["error_type"] for event in events] == ["device_error"]
    with pytest.raises(RuntimeError, match="unusable"):
        engine.check_device()


@pytest.mark.parametrize("failing", ["unet", "preview decoder"])
def test_device_error_in_a_run_the_client_left_still_makes_the_device_unusable(
    cache: Path, failing: str, monkeypatch: pytest.MonkeyPatch, dead_device: FakeGpuProbe
) -> None:
    """The client leaves after the first event, and the (faked) device error comes after it: in the UNet
    before the run reaches a step boundary, or from a preview decode the run only looks at after it
    has seen the cancellation. Nobody reads the error event; the run's outcome still decides."""
    outcomes: list[RunOutcome] = []
    engine = SDXLEngine(EngineConfig.of(tiny_config(cache)), on_run_finished=outcomes.append)
    client_left = threading.Event()
    cancel = GenerationRun.cancel
    monkeypatch.setattr(GenerationRun, "cancel", lambda run: (cancel(run), client_left.set()))
    unet = engine.models.pipeline.unet
    forward, calls = unet.forward, []

    def second_step_waits_for_the_client_to_leave(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            assert client_left.wait(timeout=30)
            if failing == "unet":
                raise RuntimeError(ILLEGAL_ADDRESS)
        return forward(*args, **kwargs)

    unet.forward = second_step_waits_for_the_client_to_leave
    if failing == "preview decoder":
        engine.models.preview_decoder.decode = raising(RuntimeError(ILLEGAL_ADDRESS))

    async def leave_after_the_first_event() -> str:
        stream = engine.generate(
            REQUEST.model_copy(update={"preview_interval": 1}), RunMode(previews=True, progress=True)
        )
        async with contextlib.aclosing(stream):
            async for event in stream:
                return event.type
        return "none"

    assert asyncio.run(leave_after_the_first_event()) == "progress"
    (outcome,) = outcomes
    assert (outcome.status, outcome.error.error_type) == ("failed", "device_error")
    with pytest.raises(RuntimeError, match="unusable"):
        engine.check_device()


def test_health_check_does_not_hold_up_a_streaming_run(engine: SDXLEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """`check_health` runs `check_device` in a thread: while it is slow (as `torch.cuda.synchronize` is
    behind queued GPU work; faked, there is no GPU here), the run's events keep reaching the client.
    The slow check waits for the client to have read an event after the check began: run on the event
    loop, it would wait in vain."""
    deployment = SDXLDeployment.func_or_class.__new__(SDXLDeployment.func_or_class)
    deployment._engine = engine  # only the engine: no Serve replica context, no metrics
    check_device = engine.check_device
    read_during_the_check = threading.Event()
    waited: list[bool] = []

    def slow_check_device() -> None:
        waited.append(read_during_the_check.wait(timeout=10))
        check_device()

    monkeypatch.setattr(engine, "check_device", slow_check_device)

    async def stream_while_checking() -> list[str]:
        request = REQUEST.model_copy(update={"num_inference_steps": 4, "preview_interval": 1})
        types: list[str] = []
        health = None
        async for event in engine.generate(request, STREAM):
            types.append(event.type)
            if health is None:
                health = asyncio.ensure_future(deployment.check_health())
                await asyncio.sleep(0)  # the check starts before the next event is read
            else:
                read_during_the_check.set()
        await health
        return types

    types = asyncio.run(stream_while_checking())
    assert types[-1] == "final" and len(types) >= 2
    assert waited == [True]


def test_check_device_waits_for_the_gpu_only_between_runs(engine: SDXLEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake CUDA device (no GPU here): between runs the check synchronizes the device, and during a
    run it does not wait behind that run's queued work."""
    synchronized: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", synchronized.append)
    monkeypatch.setattr(engine, "models", dataclasses.replace(engine.models, device=torch.device("cuda")))
    engine.check_device()
    assert synchronized == [torch.device("cuda")]
    monkeypatch.setattr(SDXLEngine, "busy", property(lambda engine: True))
    engine.check_device()
    assert synchronized == [torch.device("cuda")]


def test_a_failing_metrics_callback_fails_no_generation(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Metrics are called on the pipeline and preview threads and at a run's end: one that raises (a
    metrics backend's bug) is logged, and the client still gets its images."""

    def broken(*args: object) -> None:
        raise ValueError("metrics backend down")

    engine = SDXLEngine(
        EngineConfig.of(tiny_config(cache)),
        on_preview_rendered=broken,
        on_run_finished=broken,
        on_first_preview=broken,
    )
    assert [event["type"] for event in collect(engine, REQUEST)] == ["preview", "final"]
    assert "metrics backend down" in caplog.text and not engine.busy
    assert [event["type"] for event in collect(engine, REQUEST)] == ["preview", "final"]
