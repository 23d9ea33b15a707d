"""The job queue's dispatcher without Serve: a real tiny engine behind the in-process generation client,
the memory store. Jobs run to completion with fal's logs, cancel stops them, a dead dispatcher's job
is run again by another, and no more jobs are dispatched than the replicas can take."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.engine import SDXLEngine
from deployments.in_process import InProcessGenerationClient
from serve_app.config import QueueConfig
from serve_app.queue.dispatcher import DISPATCH_AHEAD, JobDispatcher
from serve_app.queue.memory_store import MemoryJobStore
from serve_app.queue.records import JobRecord
from serve_app.queue.store import JobStore
from tests.tiny_engine import resolved, tiny_engine

SMALL = resolved(num_inference_steps=3, width=128, height=128, seed=11)
LONG = resolved(num_inference_steps=50, width=256, height=256, seed=12)
CONFIG = QueueConfig(lease_s=1.0, max_attempts=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture()
def engine(cache: str) -> SDXLEngine:
    """One per test: an engine lives on one event loop (a replica's), and each test runs its own."""
    return tiny_engine(cache)


async def completed(store: JobStore, request_id: str, timeout_s: float = 60) -> JobRecord:
    deadline = time.monotonic() + timeout_s
    while (record := await store.get(request_id)) is None or record.state != "COMPLETED":
        assert time.monotonic() < deadline, f"job {request_id} did not complete: {record}"
        await asyncio.sleep(0.05)
    return record


async def running(store: JobStore, request_id: str, steps: int = 2) -> None:
    """Until the job has logged `steps` denoising steps."""
    while True:
        record = await store.get(request_id)
        if sum(log.message.startswith("step") for log in record.logs) >= steps:
            return
        await asyncio.sleep(0.02)


def run(scenario) -> object:
    return asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_job_runs_to_completion_with_fals_logs_and_its_images_stored(engine: SDXLEngine) -> None:
    async def scenario() -> tuple[JobRecord, tuple[bytes, str] | None]:
        store = MemoryJobStore()
        dispatcher = JobDispatcher(store, InProcessGenerationClient(engine), CONFIG, "local/sdxl")
        await dispatcher.start()
        try:
            submitted = await dispatcher.submit(SMALL, webhook_url=None)
            record = await completed(store, submitted.snapshot.request_id)
            return record, await store.get_file(record.result["images"][0]["url"].removeprefix("/files/"))
        finally:
            await dispatcher.close()

    record, image = run(scenario)
    messages = [log.message for log in record.logs]
    assert messages == ["Queued", "Started", "step 1/3", "step 2/3", "step 3/3", "Completed"]
    assert record.error is None and record.result["seed"] == 11 and record.attempts == 1
    assert image is not None and image[1] == "image/jpeg" and image[0][:2] == b"\xff\xd8"


def test_a_failed_generation_completes_the_job_with_its_error(engine: SDXLEngine) -> None:
    unet = engine.models.pipeline.unet
    forward = unet.forward

    def broken(*args, **kwargs):
        raise RuntimeError("weights on fire")

    async def scenario() -> JobRecord:
        store = MemoryJobStore()
        dispatcher = JobDispatcher(store, InProcessGenerationClient(engine), CONFIG, "local/sdxl")
        await dispatcher.start()
        try:
            submitted = await dispatcher.submit(SMALL, webhook_url=None)
            return await completed(store, submitted.snapshot.request_id)
        finally:
            await dispatcher.close()

    unet.forward = broken
    try:
        record = run(scenario)
    finally:
        unet.forward = forward
    assert record.result is None and record.error.error_type == "generation_failed"
    assert "fire" not in str(record.error.detail)  # exception text stays in the logs


def test_cancel_removes_a_queued_job_and_stops_a_running_one_within_a_step(engine: SDXLEngine) -> None:
    async def scenario() -> tuple[JobRecord, JobRecord, str, str]:
        store = MemoryJobStore()
        dispatcher = JobDispatcher(store, InProcessGenerationClient(engine), CONFIG, "local/sdxl")
        await dispatcher.start()
        try:
            first = (await dispatcher.submit(LONG, webhook_url=None)).snapshot.request_id
            second = (await dispatcher.submit(LONG, webhook_url=None)).snapshot.request_id
            third = (await dispatcher.submit(LONG, webhook_url=None)).snapshot.request_id
            await running(store, first)
            queued_outcome = await dispatcher.cancel(third)  # behind the one dispatched ahead
            running_outcome = await dispatcher.cancel(first)
            stopped = await completed(store, first, timeout_s=10)
            removed = await completed(store, third, timeout_s=1)
            await dispatcher.cancel(second)
            await completed(store, second)
            return stopped, removed, running_outcome, queued_outcome
        finally:
            await dispatcher.close()

    stopped, removed, running_outcome, queued_outcome = run(scenario)
    assert (running_outcome, queued_outcome) == ("requested", "removed")
    assert stopped.error.error_type == "cancelled"
    assert sum(log.message.startswith("step") for log in stopped.logs) < 50
    assert removed.error.error_type == "cancelled" and "Started" not in [log.message for log in removed.logs]
    assert not engine.busy


def test_a_job_of_a_dispatcher_that_died_is_run_again_by_another(engine: SDXLEngine) -> None:
    """Two dispatchers on one store, as two job-queue replicas on one Redis; the first dies mid-run
    (its tasks stop, its lease is not renewed) and the second takes the job over after the lease."""

    async def scenario() -> JobRecord:
        store = MemoryJobStore()
        client = InProcessGenerationClient(engine)
        first = JobDispatcher(store, client, CONFIG, "local/sdxl")
        await first.start()
        request_id = (await first.submit(LONG, webhook_url=None)).snapshot.request_id
        await running(store, request_id)
        await first.close()  # died: no finish, no renewal
        second = JobDispatcher(store, client, CONFIG, "local/sdxl")
        await second.start()
        try:
            return await completed(store, request_id)
        finally:
            await second.close()

    record = run(scenario)
    assert record.error is None and record.attempts == 2 and record.result["seed"] == 12
    assert [log.message for log in record.logs].count("Completed") == 1


class CountingClient(InProcessGenerationClient):
    def __init__(self, engine: SDXLEngine, replicas: int) -> None:
        super().__init__(engine)
        self.replicas = replicas

    async def ready_replicas(self) -> int:
        return self.replicas


def test_no_more_jobs_are_dispatched_than_the_replicas_take_plus_one(engine: SDXLEngine) -> None:
    """The rest stay in the store, in order, where cancel removes them and positions are true."""

    async def scenario() -> tuple[int, list[str], list[str]]:
        store = MemoryJobStore()
        dispatcher = JobDispatcher(store, CountingClient(engine, replicas=1), CONFIG, "local/sdxl")
        await dispatcher.start()
        try:
            ids = [(await dispatcher.submit(LONG, webhook_url=None)).snapshot.request_id for _ in range(5)]
            await running(store, ids[0], steps=1)
            dispatched = dispatcher.stats()["dispatched"]
            queued = await store.queued_ids()
            for request_id in ids:
                await dispatcher.cancel(request_id)
            for request_id in ids:
                await completed(store, request_id)
            return dispatched, queued, ids
        finally:
            await dispatcher.close()

    dispatched, queued, ids = run(scenario)
    assert dispatched == 1 + DISPATCH_AHEAD
    assert queued == ids[1 + DISPATCH_AHEAD :]
