"""The job queue's dispatcher without Serve: a real tiny engine behind the in-process generation client,
the in-process store. Jobs run with fal's logs; cancel stops them; and the faults a distributed queue
meets are waited out: a store that stops answering, a claim that went to another replica (fenced), a
model replica that dies, a job-queue replica that dies or stops, a webhook receiver that is down."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Awaitable, Callable

import fakeredis
import pytest
from PIL import Image

from deployments.engine import SDXLEngine
from deployments.in_process import InProcessGenerationClient
from serve_app.config import AppConfig, QueueConfig
from serve_app.contract.errors import QueueUnavailable, ReplicaFailed
from serve_app.contract.events import RunMode
from serve_app.contract.requests import ImageToImageRequest, ResolvedRequest
from serve_app.generation.client import GenerationCall
from serve_app.queue.dispatcher import DISPATCH_AHEAD, JobDispatcher
from serve_app.queue.outputs import OutputStore
from serve_app.queue.records import JobRecord
from serve_app.queue.store import JobStore, StoreUnavailable
from tests.tiny_engine import resolved, tiny_engine

SMALL = resolved(num_inference_steps=3, width=128, height=128, seed=11)
LONG = resolved(num_inference_steps=50, width=256, height=256, seed=12)
CONFIG = QueueConfig(lease_s=1.0, max_attempts=3, store_wait_s=0.5, webhook_retry_base_s=0.1)
OWNER = "key:test"


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


def run(scenario: Callable[[], Awaitable]) -> object:
    return asyncio.run(asyncio.wait_for(scenario(), 120))


def dispatcher(store: JobStore, client, config: QueueConfig = CONFIG, **kwargs) -> JobDispatcher:
    return JobDispatcher(store, client, config, "local/sdxl", **kwargs)


class Switchable:
    """A store that can stop answering, as Redis killed or paused does: every call raises
    `StoreUnavailable` while `down` (a fake of the outage: the Redis suite kills a real one)."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self.down = False

    def __getattr__(self, name: str):
        method = getattr(self._store, name)
        if not callable(method):
            return method

        async def call(*args, **kwargs):
            if self.down:
                await asyncio.sleep(0.01)
                raise StoreUnavailable("the test took the store away")
            return await method(*args, **kwargs)

        return call


def test_a_job_runs_to_completion_with_fals_logs_and_its_images_stored(engine: SDXLEngine) -> None:
    async def scenario() -> tuple[JobRecord, tuple[bytes, str] | None]:
        store = JobStore.in_memory()
        jobs = dispatcher(store, InProcessGenerationClient(engine))
        await jobs.start()
        try:
            submitted = await jobs.submit(SMALL, webhook_url=None, owner=OWNER)
            record = await completed(store, submitted.snapshot.request_id)
            return record, await jobs.file(record.result["images"][0]["url"].removeprefix("/files/"))
        finally:
            await jobs.close()

    record, image = run(scenario)
    messages = [log.message for log in record.logs]
    assert messages == ["Queued", "Started", "step 1/3", "step 2/3", "step 3/3", "Completed"]
    assert record.error is None and record.result["seed"] == 11 and record.attempts == 1
    assert record.request_id not in record.result["images"][0]["url"]  # a token of its own
    assert image is not None and image[1] == "image/jpeg" and image[0][:2] == b"\xff\xd8"


def test_an_image_jobs_input_lives_in_the_object_store_never_in_the_store(engine: SDXLEngine) -> None:
    """Redis keeps job state, not image bytes: an image-to-image job's input goes to the object store at
    submit, by key, is read back when the job runs (the steps logged are the ones really run), and is
    deleted once the job completed."""
    image = io.BytesIO()
    Image.new("RGB", (160, 128), (10, 200, 30)).save(image, format="PNG")
    body = ImageToImageRequest(prompt="a fox", image_url="-", num_inference_steps=4, strength=0.5, seed=2)
    request = AppConfig().request_policy().resolve(body, (160, 128), image=image.getvalue())

    async def scenario() -> tuple[JobRecord, bytes]:
        server, outputs = fakeredis.FakeServer(), OutputStore.in_memory()
        store = JobStore.in_memory(server)
        jobs = dispatcher(store, InProcessGenerationClient(engine), outputs=outputs)
        await jobs.start()
        try:
            submitted = await jobs.submit(request, webhook_url=None, owner=OWNER)
            record = await completed(store, submitted.snapshot.request_id)
            for _ in range(100):  # deleted once the job completed: nothing will run it again
                if await outputs.get(record.input_keys["image"]) is None:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the job's input image outlived it")
            redis = fakeredis.FakeRedis(server=server)  # everything Redis holds, as bytes
            hashes = [key for key in redis.scan_iter() if redis.type(key) == b"hash"]
            dump = b"".join(value for key in hashes for value in redis.hgetall(key).values())
            return record, dump
        finally:
            await jobs.close()

    record, stored = run(scenario)
    assert record.error is None and record.result["images"][0]["width"] == 160
    assert "step 2/2" in [log.message for log in record.logs]  # 0.5 x 4 steps
    assert set(record.input_keys) == {"image"} and "image" not in record.request
    assert image.getvalue()[:64] not in stored and base64.b64encode(image.getvalue())[:64] not in stored


def test_a_failed_generation_completes_the_job_with_its_error(engine: SDXLEngine) -> None:
    unet = engine.models.pipeline.unet
    forward = unet.forward

    def broken(*args, **kwargs):
        raise RuntimeError("weights on fire")

    async def scenario() -> JobRecord:
        store = JobStore.in_memory()
        jobs = dispatcher(store, InProcessGenerationClient(engine))
        await jobs.start()
        try:
            submitted = await jobs.submit(SMALL, webhook_url=None, owner=OWNER)
            return await completed(store, submitted.snapshot.request_id)
        finally:
            await jobs.close()

    unet.forward = broken
    try:
        record = run(scenario)
    finally:
        unet.forward = forward
    assert record.result is None and record.error.error_type == "generation_failed"
    assert "fire" not in str(record.error.detail)  # exception text stays in the logs


def test_cancel_removes_a_queued_job_and_stops_a_running_one_within_a_step(engine: SDXLEngine) -> None:
    async def scenario() -> tuple[JobRecord, JobRecord, str, str, str]:
        store = JobStore.in_memory()
        jobs = dispatcher(store, InProcessGenerationClient(engine))
        await jobs.start()
        try:
            first, second, third = [
                (await jobs.submit(LONG, webhook_url=None, owner=OWNER)).snapshot.request_id for _ in range(3)
            ]
            await running(store, first)
            foreign = await jobs.cancel(third, "key:someone-else")
            queued_outcome = await jobs.cancel(third, OWNER)  # behind the one dispatched ahead
            running_outcome = await jobs.cancel(first, OWNER)
            stopped = await completed(store, first, timeout_s=10)
            removed = await completed(store, third, timeout_s=1)
            await jobs.cancel(second, OWNER)
            await completed(store, second)
            return stopped, removed, running_outcome, queued_outcome, foreign
        finally:
            await jobs.close()

    stopped, removed, running_outcome, queued_outcome, foreign = run(scenario)
    assert (running_outcome, queued_outcome, foreign) == ("requested", "removed", "unknown")
    assert stopped.error.error_type == "cancelled"
    assert sum(log.message.startswith("step") for log in stopped.logs) < 50
    assert removed.error.error_type == "cancelled" and removed.request is None
    assert not engine.busy


class CountingClient(InProcessGenerationClient):
    def __init__(self, engine: SDXLEngine, replicas: int) -> None:
        super().__init__(engine)
        self.replicas = replicas

    async def ready_replicas(self) -> int:
        return self.replicas


def test_no_more_jobs_are_dispatched_than_the_replicas_take_plus_one(engine: SDXLEngine) -> None:
    """The rest stay in the store, in order, where cancel removes them and positions are true."""

    async def scenario() -> tuple[int, list[str], list[str]]:
        store = JobStore.in_memory()
        jobs = dispatcher(store, CountingClient(engine, replicas=1))
        await jobs.start()
        try:
            ids = [(await jobs.submit(LONG, webhook_url=None, owner=OWNER)).snapshot.request_id for _ in range(5)]
            await running(store, ids[0], steps=1)
            dispatched = jobs.stats()["dispatched"]
            queued = await store.queued_ids()
            for request_id in ids:
                await jobs.cancel(request_id, OWNER)
            for request_id in ids:
                await completed(store, request_id)
            return dispatched, queued, ids
        finally:
            await jobs.close()

    dispatched, queued, ids = run(scenario)
    assert dispatched == 1 + DISPATCH_AHEAD
    assert queued == ids[1:]  # the claimed one waiting for the replica, then the store's queue


def test_a_store_outage_is_waited_out_and_the_finished_result_written_after_it(engine: SDXLEngine) -> None:
    """The store stops answering mid-run (Redis killed or paused): the generation goes on, its logs and
    result wait, and land once the store answers again; nothing fails, nothing runs twice."""

    async def scenario() -> tuple[JobRecord, int]:
        real = JobStore.in_memory()
        store = Switchable(real)
        jobs = dispatcher(store, InProcessGenerationClient(engine))
        await jobs.start()
        try:
            request_id = (await jobs.submit(LONG, webhook_url=None, owner=OWNER)).snapshot.request_id
            await running(real, request_id)
            store.down = True
            await asyncio.sleep(2.5)  # longer than a lease: the generation finishes meanwhile
            steps_seen_while_down = sum(log.message.startswith("step") for log in (await real.get(request_id)).logs)
            store.down = False
            return await completed(real, request_id), steps_seen_while_down
        finally:
            await jobs.close()

    record, steps_while_down = run(scenario)
    steps = [log.message for log in record.logs if log.message.startswith("step")]
    assert record.error is None and record.attempts == 1  # not requeued, not run twice
    assert steps == [f"step {n}/50" for n in range(1, 51)] and steps_while_down < 50  # logs caught up after


def test_a_run_that_lost_its_claim_writes_nothing(engine: SDXLEngine) -> None:
    """Replica A is cut off from the store longer than a lease; replica B, which sees the store, takes
    the job over and finishes it. When A's outage ends, its writes are refused (a stale token) and it
    stops: one result, and the file the result names is that run's."""

    async def scenario() -> tuple[JobRecord, dict]:
        server = fakeredis.FakeServer()
        shared = JobStore.in_memory(server=server)
        seen_by_a = Switchable(JobStore.in_memory(server=server))
        client = InProcessGenerationClient(engine)
        outputs = OutputStore.in_memory()  # one bucket both replicas write to
        a = dispatcher(seen_by_a, client, outputs=outputs)
        await a.start()
        request_id = (await a.submit(LONG, webhook_url=None, owner=OWNER)).snapshot.request_id
        await running(shared, request_id)
        seen_by_a.down = True
        b = dispatcher(JobStore.in_memory(server=server), client, outputs=outputs)
        await b.start()
        try:
            record = await completed(shared, request_id)
            seen_by_a.down = False
            await asyncio.sleep(1.0)  # A's result, if it were allowed, would land now
            record = await shared.get(request_id)
            url = record.result["images"][0]["url"]
            return record, {url: await outputs.get(url.removeprefix("/files/"))}
        finally:
            await a.close()
            await b.close()

    record, files = run(scenario)
    assert record.attempts == 2 and record.error is None
    assert [log.message for log in record.logs].count("Completed") == 1
    (stored,) = files.values()
    assert stored is not None and base64.b64encode(stored[0])  # the file the result names exists


class DyingReplicaClient(InProcessGenerationClient):
    """The model replica dies under the first `deaths` runs (a fake: `RayActorError` is what Serve's
    handle raises; the Serve suite kills a real replica)."""

    def __init__(self, engine: SDXLEngine, deaths: int) -> None:
        super().__init__(engine)
        self.deaths = deaths

    def events(self, request: ResolvedRequest, mode: RunMode) -> GenerationCall:
        if self.deaths > 0:
            self.deaths -= 1
            return Dead()
        return super().events(request, mode)


class Dead(GenerationCall):
    async def _receive(self):
        raise ReplicaFailed()

    async def _after_final(self) -> None:
        pass

    def cancel(self) -> None:
        pass


@pytest.mark.parametrize(("deaths", "outcome"), [(2, "completed"), (3, "replica_failed")])
def test_a_dead_model_replica_s_job_is_run_again_up_to_max_attempts(
    engine: SDXLEngine, deaths: int, outcome: str
) -> None:
    async def scenario() -> JobRecord:
        store = JobStore.in_memory()
        jobs = dispatcher(store, DyingReplicaClient(engine, deaths))
        await jobs.start()
        try:
            request_id = (await jobs.submit(SMALL, webhook_url=None, owner=OWNER)).snapshot.request_id
            return await completed(store, request_id)
        finally:
            await jobs.close()

    record = run(scenario)
    assert record.attempts == min(deaths + 1, 3)
    assert (record.error.error_type if record.error else "completed") == outcome


def test_a_submit_while_the_store_is_away_is_503_and_never_runs(engine: SDXLEngine) -> None:
    async def scenario() -> tuple[QueueUnavailable, list[str]]:
        real = JobStore.in_memory()
        store = Switchable(real)
        jobs = dispatcher(store, InProcessGenerationClient(engine))
        store.down = True
        with pytest.raises(QueueUnavailable) as refused:
            await jobs.submit(SMALL, webhook_url=None, owner=OWNER)
        store.down = False
        await asyncio.sleep(0.3)  # the withdrawal, once the store answers
        return refused.value, await real.queued_ids()

    refused, queued = run(scenario)
    assert refused.status_code == 503 and int(refused.headers()["Retry-After"]) >= 1
    assert queued == []


class FlakyReceiver:
    """A webhook receiver that is down for its first `failures` attempts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[str, str]] = []

    async def send(self, url: str, request_id: str, owner: str, body: str) -> str:
        self.received.append((request_id, body))
        if len(self.received) <= self.failures:
            return "retry"
        return "delivered"


def test_a_webhook_is_delivered_at_least_once_through_the_outbox_with_one_body(engine: SDXLEngine) -> None:
    """The receiver is down at first; the job-queue replica that finished the job stops before the
    delivery succeeds, and another one delivers it from the store's outbox."""

    async def scenario() -> tuple[FlakyReceiver, FlakyReceiver, str]:
        server = fakeredis.FakeServer()
        store = JobStore.in_memory(server=server)
        first_receiver, second_receiver = FlakyReceiver(failures=10), FlakyReceiver(failures=0)
        first = dispatcher(store, InProcessGenerationClient(engine), webhooks=first_receiver)
        await first.start()
        request_id = (await first.submit(SMALL, "https://hooks.example/x", OWNER)).snapshot.request_id
        await completed(store, request_id)
        while len(first_receiver.received) < 2:
            await asyncio.sleep(0.02)
        await first.close()
        second = dispatcher(
            JobStore.in_memory(server=server), InProcessGenerationClient(engine), webhooks=second_receiver
        )
        await second.start()
        try:
            while not second_receiver.received:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # delivered: no further attempts
        finally:
            await second.close()
        return first_receiver, second_receiver, request_id

    first, second, request_id = run(scenario)
    bodies = {body for _, body in first.received + second.received}
    assert len(bodies) == 1 and request_id in bodies.pop()  # every attempt: the same body and request id
    assert len(second.received) == 1


def test_a_stopping_replica_hands_its_jobs_back_at_once(engine: SDXLEngine) -> None:
    """Serve stops a job-queue replica (a redeploy, a scale-down): what no model replica has taken yet
    goes back to the queue front at once, without counting an attempt, and another replica runs it."""

    async def scenario() -> tuple[JobRecord, float]:
        server = fakeredis.FakeServer()
        store = JobStore.in_memory(server=server)
        stopping = dispatcher(store, CountingClient(engine, replicas=1))
        await stopping.start()
        ids = [(await stopping.submit(LONG, webhook_url=None, owner=OWNER)).snapshot.request_id for _ in range(2)]
        await running(store, ids[0], steps=1)
        started = time.monotonic()
        await stopping.close(handoff_wait_s=0.1)
        handed_back_after = time.monotonic() - started
        other = dispatcher(JobStore.in_memory(server=server), InProcessGenerationClient(engine))
        await other.start()
        try:
            await other.cancel(ids[0], OWNER)  # only the second matters here
            return await completed(store, ids[1]), handed_back_after
        finally:
            await other.close()

    record, handed_back_after = run(scenario)
    assert record.error is None and record.attempts == 1  # its first claim never reached a model replica
    assert handed_back_after < CONFIG.lease_s  # not after the lease lapsed


def test_a_running_jobs_previews_reach_its_viewers_and_leave_the_store_with_it(engine: SDXLEngine) -> None:
    """`queue.previews`: the run's TAESD previews are kept (the latest few) for viewers, who long-poll
    for the ones after their last; none is left once the job completes. Off: none is made."""

    async def scenario(config: QueueConfig) -> tuple[list, list, list]:
        store = JobStore.in_memory()
        jobs = dispatcher(store, InProcessGenerationClient(engine), config)
        await jobs.start()
        try:
            request_id = (await jobs.submit(LONG, webhook_url=None, owner=OWNER)).snapshot.request_id
            seen: list = []
            while (await store.get(request_id)).state != "COMPLETED":
                after = seen[-1][0] if seen else ""
                seen += await jobs.previews(request_id, after, timeout_s=0.5)  # a long poll
            return seen, await store.previews_after(request_id, ""), await jobs.previews(request_id, "", 0)
        finally:
            await jobs.close()

    seen, kept, after = run(lambda: scenario(CONFIG))
    events = [json.loads(event) for _, event in seen]
    assert len(events) >= 3 and all(event["type"] == "preview" for event in events)
    steps = [event["step"] for event in events]
    assert steps == sorted(set(steps)) and steps[-1] >= 40  # each once, in order, to the end of the run
    assert events[0]["image"]["url"].startswith("data:image/jpeg;base64,")
    assert kept == [] and after == []
    assert run(lambda: scenario(CONFIG.model_copy(update={"previews": False}))) == ([], [], [])
