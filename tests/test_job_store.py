"""The job store, on both backends: in this process (fakeredis) and on a real (throwaway) Redis. Order and
priorities, fenced claims, leases, requeues, cancel, caps and expiry, the status feed, lost jobs, the
webhook outbox, and Redis failing (unreachable, out of memory)."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable

import fakeredis
import pytest
import redis

from serve_app.contract.errors import ErrorBody, JobLost
from serve_app.contract.queue import LogEntry
from serve_app.queue import JobRecord, JobStore, QueueFull, StoreFull, StoreLimits, StoreUnavailable
from serve_app.queue.store import SubmitRefused
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
    """Makes stores of one kind that share one backend and key prefix, like the replicas of one app."""
    prefix = f"test:{uuid.uuid4().hex}:"
    if request.param == "memory":
        return functools.partial(JobStore.in_memory, server=fakeredis.FakeServer(), prefix=prefix)
    return functools.partial(JobStore.from_url, request.getfixturevalue("redis_url"), prefix=prefix)


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


def new_job(prompt: str = "a red fox", owner: str = "key:a", webhook: str | None = "https://hook/x") -> JobRecord:
    return JobRecord(app_id="sdxl", owner=owner, request={"prompt": prompt, "seed": 2**53 - 1}, webhook_url=webhook)


async def submit_many(store: JobStore, count: int, owner: str = "key:a", priority: int = 0) -> list[str]:
    ids = []
    for index in range(count):
        record = new_job(f"job {index}", owner=owner)
        await store.submit(record, max_queued=100, priority=priority)
        ids.append(record.request_id)
    return ids


async def test_submit_keeps_the_record_and_positions_count_what_is_ahead(store: JobStore) -> None:
    ids = await submit_many(store, 3)
    assert await store.queued_ids() == ids
    record = await store.get(ids[1])
    assert (record.state, record.owner, record.request["seed"], record.attempts) == ("IN_QUEUE", "key:a", 2**53 - 1, 0)
    claim = await store.claim(LONG_LEASE_S)
    assert claim.record.request_id == ids[0] and claim.token == "1"
    # Claimed but not taken by a model replica: still ahead of the others for their clients.
    late = new_job("late")
    assert await store.submit(late, max_queued=100) == 3
    assert await store.start(ids[0], claim.token, [log("Started")]) == "written"
    assert await store.queued_ids() == [*ids[1:], late.request_id]


async def test_low_priority_waits_behind_every_normal_job(store: JobStore) -> None:
    low = await submit_many(store, 2, priority=1)
    normal = await submit_many(store, 2, priority=0)
    assert await store.queued_ids() == [*normal, *low]
    assert [(await store.claim(LONG_LEASE_S)).record.request_id for _ in range(4)] == [*normal, *low]


async def test_a_job_not_started_by_its_deadline_never_runs(store: JobStore) -> None:
    """X-Fal-Request-Timeout: queued, or claimed and still waiting for a model replica, past its start
    deadline: completed 504 `start_timeout`. One that started runs to its end."""
    queued, waiting, started, patient = (new_job(str(n)) for n in range(4))
    for record in (started, waiting, queued):
        record.deadline = time.time() + 0.2
    for record in (started, waiting, queued, patient):
        await store.submit(record, max_queued=100)
    claim = await store.claim(LONG_LEASE_S)
    await store.start(started.request_id, claim.token, [log("Started")])
    await store.claim(LONG_LEASE_S)  # `waiting`: claimed, no model replica yet
    await asyncio.sleep(0.3)
    assert sorted(await store.expire_unstarted()) == sorted([waiting.request_id, queued.request_id])
    for request_id in (waiting.request_id, queued.request_id):
        record = await store.get(request_id)
        assert (record.state, record.error.error_type) == ("COMPLETED", "start_timeout")
    assert (await store.get(started.request_id)).state == "IN_PROGRESS"
    assert await store.queued_ids() == [patient.request_id]
    assert await store.expire_unstarted() == []


async def test_a_retried_submit_is_the_same_job(store: JobStore) -> None:
    """A submit whose reply was lost is sent again with the same id: one job, the same answer."""
    record = new_job()
    assert await store.submit(record, max_queued=100) == 0
    assert await store.submit(record, max_queued=100) == 0
    assert await store.queued_ids() == [record.request_id]


async def test_a_full_queue_refuses(store: JobStore) -> None:
    await submit_many(store, 2)
    with pytest.raises(QueueFull) as refused:
        await store.submit(new_job(), max_queued=2)
    assert refused.value.status_code == 503 and refused.value.headers()["Retry-After"]


async def test_a_stale_claim_writes_nothing(store: JobStore) -> None:
    """A lease lapses while its run is cut off; the job is claimed again. The first run's renewals,
    logs and result are refused: at most one run writes."""
    (request_id,) = await submit_many(store, 1)
    first = await store.claim(SHORT_LEASE_S)
    await asyncio.sleep(EXPIRY_WAIT_S)
    assert await store.reclaim_expired(max_attempts=3) == [request_id]
    second = await store.claim(LONG_LEASE_S)
    assert (first.token, second.token) == ("1", "2")
    assert await store.renew(request_id, first.token, LONG_LEASE_S) == "lost"
    assert await store.append_logs(request_id, first.token, [log("step 1/2")]) == "stale"
    assert await store.finish(request_id, first.token, result={"seed": 1}) == "stale"
    assert await store.renew(request_id, second.token, LONG_LEASE_S) == "kept"
    assert await store.finish(request_id, second.token, result={"seed": 2}, inference_time=1.25) == "completed"
    record = await store.get(request_id)
    assert (record.state, record.result, record.inference_time, record.attempts) == ("COMPLETED", {"seed": 2}, 1.25, 2)
    assert await store.finish(request_id, second.token, result={"seed": 3}) == "stale"  # exactly once


async def test_lapsed_leases_requeue_in_submit_order_then_fail(store: JobStore) -> None:
    ids = await submit_many(store, 3)
    for _ in range(2):
        await store.claim(SHORT_LEASE_S)
    await asyncio.sleep(EXPIRY_WAIT_S)
    assert await store.reclaim_expired(max_attempts=2) == ids[:2]
    assert await store.queued_ids() == ids  # back at the front, in submit order
    for _ in range(2):
        await store.claim(SHORT_LEASE_S)
    await asyncio.sleep(EXPIRY_WAIT_S)
    assert await store.reclaim_expired(max_attempts=2) == ids[:2]
    failed = await store.get(ids[0])
    assert failed.state == "COMPLETED" and failed.error.error_type == "replica_failed"


async def test_a_dead_model_replica_requeues_its_job_until_max_attempts(store: JobStore) -> None:
    ids = await submit_many(store, 2)
    claim = await store.claim(LONG_LEASE_S)
    assert await store.requeue(ids[0], claim.token, max_attempts=2) == "requeued"
    assert await store.queued_ids() == ids
    claim = await store.claim(LONG_LEASE_S)
    assert claim.token == "2"
    assert await store.requeue(ids[0], "1", max_attempts=2) == "stale"
    assert await store.requeue(ids[0], claim.token, max_attempts=2) == "failed"
    assert (await store.get(ids[0])).error.error_type == "replica_failed"


async def test_a_job_handed_back_before_it_ran_keeps_its_attempt_not_its_token(store: JobStore) -> None:
    """Its attempt is not counted, but the next claim's token is new: the first claim writes nothing more."""
    (request_id,) = await submit_many(store, 1)
    first = await store.claim(LONG_LEASE_S)
    assert await store.release(request_id, first.token, ran=False)
    second = await store.claim(LONG_LEASE_S)
    assert second.token != first.token and second.record.attempts == 1
    assert await store.renew(request_id, first.token, LONG_LEASE_S) == "lost"
    assert await store.append_logs(request_id, first.token, [log("late")]) == "stale"


async def test_cancel(store: JobStore) -> None:
    queued, running, done = await submit_many(store, 3)
    assert await store.cancel(queued, "key:other") == "unknown"  # another owner's job
    assert await store.cancel(queued, "key:a") == "removed"
    removed = await store.get(queued)
    assert removed.state == "COMPLETED" and removed.error.error_type == "cancelled"
    assert removed.request is None  # never ran: only its status is kept
    claim = await store.claim(LONG_LEASE_S)
    assert claim.record.request_id == running
    assert await store.cancel(running) == "requested"
    assert await store.renew(running, claim.token, LONG_LEASE_S) == "cancel"
    done_claim = await store.claim(LONG_LEASE_S)
    await store.finish(done, done_claim.token, result={})
    assert await store.cancel(done) == "completed"
    assert await store.cancel("nobody") == "unknown"


async def test_logs_keep_their_order_and_stop_at_completion(store: JobStore) -> None:
    (request_id,) = await submit_many(store, 1)
    claim = await store.claim(LONG_LEASE_S)
    assert await store.start(request_id, claim.token, [log("Started")]) == "written"
    for step in range(1, 4):
        assert await store.append_logs(request_id, claim.token, [log(f"step {step}")]) == "written"
    await store.finish(request_id, claim.token, result={})
    assert await store.append_logs(request_id, claim.token, [log("too late")]) == "stale"
    assert [entry.message for entry in (await store.get(request_id)).logs] == ["Started", "step 1", "step 2", "step 3"]


async def finished_jobs(store: JobStore, count: int, owner: str, size: int = 10) -> list[str]:
    ids = await submit_many(store, count, owner=owner)
    for request_id in ids:
        claim = await store.claim(LONG_LEASE_S)
        await store.finish(request_id, claim.token, result={"n": "p" * size})
    return ids


async def test_caps_evict_the_oldest_finished_jobs(make_store: StoreFactory) -> None:
    store = make_store(limits=StoreLimits(max_finished_jobs=3, max_finished_jobs_per_owner=3))
    ids = await finished_jobs(store, 5, "key:a")
    assert [await store.get(i) is not None for i in ids] == [False, False, True, True, True]
    assert await store.take_evictions() == {"cap": 2}
    assert await store.take_evictions() == {}  # each eviction reported once


async def test_an_evicted_job_is_never_taken_for_a_lost_one(make_store: StoreFactory) -> None:
    """A mirror that missed a job's completion still holds it as unfinished; the store evicted it since.
    It is unknown now, not lost: no second outcome, no second webhook."""
    store = make_store(limits=StoreLimits(max_finished_jobs_per_owner=1))
    first, second = await finished_jobs(store, 2, "key:a")
    assert await store.get(first) is None
    assert await store.mark_lost([(first, "key:a", "https://hook/x")], JobLost().body()) == []
    assert await store.get(first) is None


async def test_one_owner_cannot_evict_another_owners_results(make_store: StoreFactory) -> None:
    store = make_store(limits=StoreLimits(max_finished_jobs=100, max_finished_bytes_per_owner=3_000))
    theirs = await finished_jobs(store, 2, "key:b", size=100)
    mine = await finished_jobs(store, 30, "key:a", size=1_000)  # a flood: ~30 KB against a 3 KB cap
    assert all([await store.get(i) is not None for i in theirs])
    assert sum([await store.get(i) is not None for i in mine]) <= 3


async def test_finished_jobs_expire_queued_and_running_never(make_store: StoreFactory) -> None:
    store = make_store(limits=StoreLimits(result_ttl_s=0.3))
    done, running, queued = await submit_many(store, 3)
    claim = await store.claim(LONG_LEASE_S)
    await store.finish(done, claim.token, result={})
    await store.claim(LONG_LEASE_S)
    await asyncio.sleep(0.5)
    assert await store.sweep() == 1
    assert await store.get(done) is None
    assert (await store.get(running)).state == "IN_PROGRESS" and (await store.get(queued)).state == "IN_QUEUE"


async def test_the_feed_tells_what_changed_since_a_version(store: JobStore) -> None:
    first = await store.changes("", 0, 0)
    assert (first.epoch, first.jobs) == ("", [])  # an empty store has no epoch yet
    ids = await submit_many(store, 2)
    changes = await store.changes(first.epoch, first.version, first.queue_version)
    assert changes.reset and changes.epoch  # the first write made one: the mirror starts over, once
    assert [job.request_id for job in changes.jobs] == ids and changes.queued == ids
    claim = await store.claim(LONG_LEASE_S)
    await store.start(ids[0], claim.token, [log("Started")])
    later = await store.changes(changes.epoch, changes.version, changes.queue_version)
    assert not later.reset and [job.request_id for job in later.jobs] == [ids[0]]
    assert later.jobs[0].generating and [entry.message for entry in later.jobs[0].logs][-1] == "Started"
    assert later.queued == [ids[1]]
    nothing = await store.changes(later.epoch, later.version, later.queue_version)
    assert nothing.jobs == [] and nothing.queued is None


async def test_a_store_that_starts_over_has_a_new_epoch_and_loses_nothing_silently(
    store: JobStore, backend: StoreFactory
) -> None:
    """FLUSHDB (or a restart without persistence): mirrors start over, and the accepted jobs they still
    hold are completed as lost (with their webhook), unless a run put them back."""
    ids = await submit_many(store, 3)
    before = await store.changes("", 0, 0)
    await store._redis.flushdb()
    await submit_many(store, 1)
    after = await store.changes(before.epoch, before.version, before.queue_version)
    assert after.reset and after.epoch != before.epoch
    assert await store.exists(ids) == [False, False, False]
    restored = new_job("restored", webhook=None).model_copy(
        update={"request_id": ids[2], "state": "COMPLETED", "result": {"seed": 7}, "attempts": 1}
    )
    assert await store.restore(restored)
    lost = [(ids[0], "key:a", "https://hook/x"), (ids[1], "key:a", None), (ids[2], "key:a", None)]
    assert await store.mark_lost(lost, JobLost().body()) == ids[:2]
    record = await store.get(ids[0])
    assert (record.state, record.error.error_type, record.owner) == ("COMPLETED", "job_lost", "key:a")
    assert (await store.get(ids[2])).result == {"seed": 7}
    (due,) = await store.due_webhooks(lease_s=30)
    assert (due.request_id, due.url) == (ids[0], "https://hook/x")


async def test_a_running_job_the_store_lost_is_put_back_by_its_run(store: JobStore) -> None:
    (request_id,) = await submit_many(store, 1)
    claim = await store.claim(LONG_LEASE_S)
    await store._redis.flushdb()
    assert await store.renew(request_id, claim.token, LONG_LEASE_S) == "missing"
    assert await store.append_logs(request_id, claim.token, [log("step 2")]) == "missing"
    assert await store.readopt(claim.record, claim.token, LONG_LEASE_S, [log("Queued"), log("put back")])
    assert not await store.readopt(claim.record, claim.token, LONG_LEASE_S, [])  # once
    assert await store.append_logs(request_id, claim.token, [log("step 2")]) == "written"
    assert await store.finish(request_id, claim.token, result={"seed": 5}) == "completed"
    record = await store.get(request_id)
    assert record.result == {"seed": 5} and [e.message for e in record.logs] == ["Queued", "put back", "step 2"]


async def test_the_webhook_outbox_hands_each_delivery_to_one_replica_at_a_time(make_store: StoreFactory) -> None:
    one, other = make_store(), make_store()
    (request_id,) = await submit_many(one, 1)
    claim = await one.claim(LONG_LEASE_S)
    await one.finish(request_id, claim.token, error=ErrorBody(detail="x", error_type="generation_failed"))
    (delivery,) = await one.due_webhooks(lease_s=30)
    assert (delivery.attempt, delivery.body) == (1, "")
    assert await other.due_webhooks(lease_s=30) == []  # leased to the first
    assert await one.keep_webhook_body(request_id, '{"a": 1}') == '{"a": 1}'
    assert await other.keep_webhook_body(request_id, '{"b": 2}') == '{"a": 1}'  # every attempt, the same body
    await one.settle_webhook(request_id, retry_in_s=0.05)
    await asyncio.sleep(0.15)
    (again,) = await other.due_webhooks(lease_s=30)
    assert (again.attempt, again.body) == (2, '{"a": 1}')
    await other.settle_webhook(request_id, retry_in_s=None)
    await asyncio.sleep(0.1)
    assert await one.due_webhooks(lease_s=30) == []


async def test_a_withdrawn_submit_never_runs(store: JobStore) -> None:
    """A submit answered 503 (the store did not answer in time) but taken by the store after all, or
    arriving after the withdrawal: removed, or refused."""
    taken, late = new_job("taken"), new_job("late")
    await store.submit(taken, max_queued=100)
    assert await store.withdraw(taken.request_id)
    assert (await store.get(taken.request_id)).state == "COMPLETED"
    assert not await store.withdraw(late.request_id)
    with pytest.raises(SubmitRefused):
        await store.submit(late, max_queued=100)
    with pytest.raises(SubmitRefused):  # reaching the store after its client was told 503
        await store.submit(new_job("slow"), max_queued=100, accept_until=time.time() - 1)
    assert await store.queued_ids() == []


async def test_a_new_store_on_the_same_backend_sees_everything(make_store: StoreFactory) -> None:
    """A restarted job-queue replica, or a second one: the same queue, leases, files and feed."""
    old = make_store()
    ids = await submit_many(old, 3)
    claim = await old.claim(SHORT_LEASE_S)
    await old.append_logs(ids[0], claim.token, [log("step 1")])
    new = make_store()
    assert await new.queued_ids() == ids and await new.running_ids() == ids[:1]
    await asyncio.sleep(EXPIRY_WAIT_S)
    assert await new.reclaim_expired(max_attempts=3) == ids[:1]
    claimed = await new.claim(LONG_LEASE_S)
    assert (claimed.record.request_id, claimed.token, claimed.record.logs) == (ids[0], "2", [log("step 1")])


async def test_concurrent_claims_never_share_a_job(store: JobStore) -> None:
    ids = await submit_many(store, 20)
    claims = await asyncio.gather(*(store.claim(LONG_LEASE_S) for _ in range(40)))
    claimed = [claim.record.request_id for claim in claims if claim is not None]
    assert sorted(claimed) == sorted(ids) and claims.count(None) == 20


async def test_an_unreachable_redis_is_unavailable_not_an_error() -> None:
    with socket_nobody_listens_on() as url:
        store = JobStore.from_url(url)
        with pytest.raises(StoreUnavailable):
            await store.submit(new_job(), max_queued=10)
        await store.close()


async def test_a_redis_out_of_memory_refuses_writes_as_store_full(redis_url: str) -> None:  # noqa: F811
    admin = redis.Redis.from_url(redis_url)
    store = JobStore.from_url(redis_url, prefix=f"test:{uuid.uuid4().hex}:")
    used = admin.info("memory")["used_memory"]
    admin.config_set("maxmemory", used + 64 * 1024)
    admin.config_set("maxmemory-policy", "noeviction")
    try:
        with pytest.raises(StoreFull):
            for index in range(1000):
                await store.submit(new_job("x" * 4096 + str(index)), max_queued=10_000)
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        await store.close()


class socket_nobody_listens_on:
    def __enter__(self) -> str:
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        return f"redis://127.0.0.1:{self._socket.getsockname()[1]}/0"

    def __exit__(self, *exc: object) -> None:
        self._socket.close()
