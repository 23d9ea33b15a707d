"""The job store contract, run against both stores: in memory and on a real (throwaway) Redis."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from serve_app.contract.errors import ErrorBody
from serve_app.contract.queue import LogEntry
from serve_app.queue import JobRecord, JobStore, MemoryJobStore, QueueFull
from serve_app.queue.redis_store import RedisJobStore
from tests.redis_server import redis_url  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.anyio

LONG_LEASE_S = 60.0  # never expires during a test
SHORT_LEASE_S = 0.1  # expired after EXPIRY_WAIT_S
EXPIRY_WAIT_S = 0.25

StoreFactory = Callable[..., JobStore]


def log(message: str) -> LogEntry:
    return LogEntry(message=message, timestamp="2025-01-01T00:00:00+00:00")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> StoreFactory:
    """Makes stores of one kind; Redis ones share a fresh key prefix, like replicas of one app."""
    if request.param == "memory":
        return MemoryJobStore
    url = request.getfixturevalue("redis_url")
    return functools.partial(RedisJobStore.from_url, url, prefix=f"test:{uuid.uuid4().hex}:")


@pytest.fixture
async def make_store(backend: StoreFactory) -> AsyncIterator[StoreFactory]:
    stores: list[JobStore] = []

    def make(**kwargs) -> JobStore:
        stores.append(backend(**kwargs))
        return stores[-1]

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> JobStore:
    return make_store()


def new_job(prompt: str = "a red fox") -> JobRecord:
    return JobRecord(app_id="sdxl", request={"prompt": prompt, "seed": 2**53 - 1}, webhook_url="https://hook/x")


async def submit_many(store: JobStore, count: int, max_queued: int = 100) -> list[str]:
    ids = []
    for index in range(count):
        record = new_job(f"job {index}")
        assert await store.submit(record, max_queued) == index
        ids.append(record.request_id)
    return ids


def test_record_round_trips_through_json() -> None:
    record = new_job().model_copy(update={"error": ErrorBody(detail="x", error_type="y")})
    assert JobRecord.model_validate_json(record.model_dump_json()) == record


async def test_submit_keeps_order_and_positions(store: JobStore) -> None:
    ids = await submit_many(store, 3)
    assert await store.queued_ids() == ids
    assert [await store.position(i) for i in ids] == [0, 1, 2]
    stored = await store.get(ids[0])
    assert stored is not None and stored.state == "IN_QUEUE" and stored.request["seed"] == 2**53 - 1

    claimed = await store.claim("owner", LONG_LEASE_S)
    assert claimed is not None and claimed.request_id == ids[0]
    assert [await store.position(i) for i in ids] == [None, 0, 1]
    assert await store.position("nobody") is None


async def test_submit_raises_queue_full(make_store: StoreFactory) -> None:
    store = make_store(retry_after_s=7.0)
    await submit_many(store, 2, max_queued=2)
    with pytest.raises(QueueFull) as raised:
        await store.submit(new_job(), max_queued=2)
    assert raised.value.retry_after_s == 7.0
    await store.claim("owner", LONG_LEASE_S)  # running jobs do not count
    assert await store.submit(new_job(), max_queued=2) == 1


async def test_submit_refuses_a_duplicate(store: JobStore) -> None:
    record = new_job()
    await store.submit(record, 10)
    with pytest.raises(ValueError):
        await store.submit(record, 10)


async def test_claim_pops_the_head(store: JobStore) -> None:
    ids = await submit_many(store, 2)
    first = await store.claim("a", LONG_LEASE_S)
    assert first is not None
    assert (first.request_id, first.state, first.attempts) == (ids[0], "IN_PROGRESS", 1)
    assert first.started_at is not None and first.started_at >= first.submitted_at
    assert (await store.claim("b", LONG_LEASE_S)).request_id == ids[1]
    assert await store.claim("a", LONG_LEASE_S) is None
    assert sorted(await store.running_ids()) == sorted(ids)
    assert await store.queued_ids() == []


@pytest.mark.parametrize(("finisher", "finished"), [("a", True), ("b", False), (None, True)])
async def test_finish_exactly_once(store: JobStore, finisher: str | None, finished: bool) -> None:
    (request_id,) = await submit_many(store, 1)
    await store.claim("a", LONG_LEASE_S)
    result = {"images": [{"url": "/files/1.jpeg"}], "seed": 2**53 - 1}
    assert await store.finish(request_id, finisher, result=result, inference_time=1.25) is finished
    if not finished:  # another owner's finish changed nothing: the lease holder still runs it
        assert (await store.get(request_id)).state == "IN_PROGRESS"
        assert await store.renew(request_id, "a", LONG_LEASE_S) is True
        assert await store.finish(request_id, "a", result=result, inference_time=1.25) is True

    for late_finisher in ("a", None):
        assert await store.finish(request_id, late_finisher, error=ErrorBody(detail="x", error_type="y")) is False
    record = await store.get(request_id)
    assert (record.state, record.result, record.inference_time, record.error) == ("COMPLETED", result, 1.25, None)
    assert record.finished_at is not None and await store.running_ids() == []
    assert await store.renew(request_id, "a", LONG_LEASE_S) is False


async def test_finish_unknown_job(store: JobStore) -> None:
    assert await store.finish("nobody", None, result={}) is False


@pytest.mark.parametrize(
    ("state", "outcome"),
    [("queued", "removed"), ("running", "requested"), ("completed", "completed"), ("unknown", "unknown")],
)
async def test_cancel(store: JobStore, state: str, outcome: str) -> None:
    ids = await submit_many(store, 3)
    target = {"queued": ids[1], "running": ids[0], "completed": ids[0], "unknown": "nobody"}[state]
    if state in ("running", "completed"):
        await store.claim("a", LONG_LEASE_S)
    if state == "completed":
        await store.finish(target, "a", result={})

    assert await store.cancel(target) == outcome
    record = await store.get(target)
    if state == "queued":
        assert await store.queued_ids() == [ids[0], ids[2]]
        assert await store.position(ids[2]) == 1
        assert record.state == "COMPLETED" and record.result is None
        assert record.error.error_type == "cancelled"
        assert await store.finish(target, None, result={}) is False
    elif state == "running":
        assert record.state == "IN_PROGRESS" and record.cancel_requested
        assert await store.finish(target, "a", error=ErrorBody(detail="stop", error_type="cancelled"))
    elif state == "completed":
        assert record.error is None and not record.cancel_requested
    else:
        assert record is None


async def test_renew_keeps_a_lease_alive(store: JobStore) -> None:
    (request_id,) = await submit_many(store, 1)
    await store.claim("a", SHORT_LEASE_S)
    assert await store.renew(request_id, "a", LONG_LEASE_S)
    assert not await store.renew(request_id, "b", LONG_LEASE_S)
    await asyncio.sleep(EXPIRY_WAIT_S)
    assert await store.reclaim_expired(max_attempts=3) == []


async def test_expired_leases_go_back_to_the_front(store: JobStore) -> None:
    ids = await submit_many(store, 4)
    await store.claim("a", SHORT_LEASE_S)
    await store.claim("b", SHORT_LEASE_S)
    await store.claim("c", LONG_LEASE_S)
    await asyncio.sleep(EXPIRY_WAIT_S)

    assert await store.reclaim_expired(max_attempts=3) == ids[:2]
    assert await store.queued_ids() == [ids[0], ids[1], ids[3]]  # ahead of fresh jobs, in submit order
    assert await store.running_ids() == [ids[2]]
    assert not await store.renew(ids[0], "a", LONG_LEASE_S)  # the old owner lost it
    assert not await store.finish(ids[0], "a", result={})  # ... and cannot complete it
    record = await store.get(ids[0])
    assert (record.state, record.attempts, record.started_at) == ("IN_QUEUE", 1, None)

    await store.submit(new_job(), 100)  # still behind the re-queued ones
    assert (await store.queued_ids())[:2] == ids[:2]
    reclaimed = await store.claim("d", LONG_LEASE_S)
    assert (reclaimed.request_id, reclaimed.attempts) == (ids[0], 2)


async def test_reclaim_gives_up_after_max_attempts(store: JobStore) -> None:
    (request_id,) = await submit_many(store, 1)
    for attempt in (1, 2):
        claimed = await store.claim(f"owner-{attempt}", SHORT_LEASE_S)
        assert claimed.attempts == attempt
        await asyncio.sleep(EXPIRY_WAIT_S)
        assert await store.reclaim_expired(max_attempts=2) == [request_id]

    record = await store.get(request_id)
    assert record.state == "COMPLETED" and record.finished_at is not None
    assert record.error.error_type == "replica_failed"
    assert await store.queued_ids() == [] and await store.running_ids() == []
    assert await store.finish(request_id, None, result={}) is False


async def test_reclaim_completes_a_job_cancelled_while_running(store: JobStore) -> None:
    (request_id,) = await submit_many(store, 1)
    await store.claim("a", SHORT_LEASE_S)
    assert await store.cancel(request_id) == "requested"
    await asyncio.sleep(EXPIRY_WAIT_S)
    assert await store.reclaim_expired(max_attempts=3) == [request_id]
    record = await store.get(request_id)
    assert record.state == "COMPLETED" and record.error.error_type == "cancelled"
    assert await store.queued_ids() == []


async def test_logs_keep_their_order(store: JobStore) -> None:
    (request_id,) = await submit_many(store, 1)
    await store.append_logs(request_id, [log("queued")])
    await store.claim("a", LONG_LEASE_S)
    for step in range(1, 4):
        await store.append_logs(request_id, [log(f"step {step}")])
    await store.append_logs(request_id, [log("4"), log("5")])
    await store.append_logs(request_id, [])
    messages = ["queued", "step 1", "step 2", "step 3", "4", "5"]
    assert [entry.message for entry in (await store.get(request_id)).logs] == messages

    await store.finish(request_id, "a", result={})
    await store.append_logs(request_id, [log("too late")])
    assert [entry.message for entry in (await store.get(request_id)).logs] == messages
    await store.append_logs("nobody", [log("lost")])
    assert await store.get("nobody") is None


async def test_files_round_trip(store: JobStore) -> None:
    data = bytes(range(256)) * 4
    await store.put_file("abc.png", data, "image/png")
    assert await store.get_file("abc.png") == (data, "image/png")
    assert await store.get_file("missing.png") is None


async def test_completed_jobs_and_files_expire(make_store: StoreFactory) -> None:
    store = make_store(result_ttl_s=0.5)
    done, running, queued = await submit_many(store, 3)
    await store.claim("a", LONG_LEASE_S)
    await store.claim("a", LONG_LEASE_S)
    await store.append_logs(done, [log("m")])
    await store.finish(done, "a", result={})
    await store.put_file("done.jpeg", b"jpeg", "image/jpeg")
    assert await store.get(done) is not None

    await asyncio.sleep(0.8)
    assert await store.get(done) is None
    assert await store.get_file("done.jpeg") is None
    assert await store.cancel(done) == "unknown"
    assert (await store.get(running)).state == "IN_PROGRESS"  # queued and running jobs never expire
    assert (await store.get(queued)).state == "IN_QUEUE"


async def test_concurrent_claims_never_share_a_job(store: JobStore) -> None:
    ids = await submit_many(store, 20)
    claims = await asyncio.gather(*(store.claim(f"owner-{n % 2}", LONG_LEASE_S) for n in range(40)))
    claimed = [record.request_id for record in claims if record is not None]
    assert sorted(claimed) == sorted(ids)
    assert claims.count(None) == 20


async def test_memory_store_bounds_completed_jobs() -> None:
    store = MemoryJobStore(max_completed=2)
    ids = await submit_many(store, 3)
    for request_id in ids:
        await store.claim("a", LONG_LEASE_S)
        await store.finish(request_id, "a", result={})
    assert [await store.get(i) is not None for i in ids] == [False, True, True]


async def test_a_new_redis_store_sees_everything(redis_url: str) -> None:  # noqa: F811
    """A restarted job-queue replica: a new client on the same Redis and prefix takes over."""
    prefix = f"test:{uuid.uuid4().hex}:"
    old = RedisJobStore.from_url(redis_url, prefix=prefix)
    ids = await submit_many(old, 3)
    await old.claim("old-replica", SHORT_LEASE_S)
    await old.append_logs(ids[0], [log("step 1")])
    await old.put_file("f", b"x", "image/jpeg")
    await old.close()

    new = RedisJobStore.from_url(redis_url, prefix=prefix)
    try:
        assert await new.queued_ids() == ids[1:] and await new.running_ids() == ids[:1]
        assert await new.get_file("f") == (b"x", "image/jpeg")
        await asyncio.sleep(EXPIRY_WAIT_S)
        assert await new.reclaim_expired(max_attempts=3) == ids[:1]
        assert await new.queued_ids() == ids
        claimed = await new.claim("new-replica", LONG_LEASE_S)
        assert (claimed.request_id, claimed.attempts, claimed.logs) == (ids[0], 2, [log("step 1")])
        assert await new.finish(ids[0], "new-replica", result={"ok": True})
    finally:
        await new.close()
