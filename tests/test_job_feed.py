"""The status mirror each ingress replica keeps: what it knows without asking the job queue, and how the
store's word wins (a store that started over, a job it lost)."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.config import QueueConfig
from serve_app.contract.queue import LogEntry
from serve_app.queue.dispatcher import JobDispatcher
from serve_app.queue.feed import JobMirror
from serve_app.queue.records import JobRecord
from serve_app.queue.store import FeedChanges, JobSnapshot, JobStore

pytestmark = pytest.mark.anyio


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


class NoModel:
    """No model replica ever answers: these tests are about status, not generations."""

    def events(self, request, mode):
        raise AssertionError("nothing is dispatched here")

    async def ready_replicas(self) -> int:
        return 0


def follow(store: JobStore, audit_after_s: float = 60.0) -> tuple[JobMirror, JobDispatcher]:
    """A mirror of `store` through a dispatcher's feed and audit, as an ingress follows the job queue."""
    dispatcher = JobDispatcher(store, NoModel(), QueueConfig(), "local/sdxl")

    async def fetch(epoch: str, since: int, queue_since: int, timeout_s: float):
        return await dispatcher.changes(epoch, since, queue_since, min(timeout_s, 0.05))

    mirror = JobMirror(fetch, dispatcher.audit, finished_ttl_s=60, poll_timeout_s=0.05, audit_after_s=audit_after_s)
    mirror.start()
    return mirror, dispatcher


async def submitted(store: JobStore, count: int) -> list[str]:
    ids = []
    for index in range(count):
        record = JobRecord(app_id="local/sdxl", request={"prompt": f"{index}"}, logs=[LogEntry.now("Queued")])
        await store.submit(record, max_queued=100)
        ids.append(record.request_id)
    return ids


async def until(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the mirror did not catch up")


async def test_the_mirror_follows_states_logs_and_positions() -> None:
    store = JobStore.in_memory()
    mirror, _ = follow(store)
    ids = await submitted(store, 3)
    await until(lambda: mirror.position(ids[2]) == 2)
    claim = await store.claim(60)
    await until(lambda: mirror.get(ids[0]).state == "IN_PROGRESS")
    assert mirror.position(ids[0]) == 0  # claimed, no model replica yet: still first in line
    await store.start(ids[0], claim.token, [LogEntry.now("Started")])
    await until(lambda: mirror.get(ids[0]).generating)
    assert [log.message for log in mirror.get(ids[0]).logs] == ["Queued", "Started"]
    assert (mirror.position(ids[0]), mirror.position(ids[1])) == (None, 0)


async def test_a_store_that_starts_over_resets_the_mirror_and_its_lost_jobs_complete_as_lost() -> None:
    """FLUSHDB, or a Redis restarted without its data: the mirror starts over, and the accepted jobs it
    still held are completed as `job_lost` rather than polled for ever."""
    store = JobStore.in_memory()
    mirror, _ = follow(store, audit_after_s=0.2)
    lost = await submitted(store, 2)
    await until(lambda: all(mirror.get(request_id) for request_id in lost))
    await store._redis.flushdb()
    fresh = await submitted(store, 1)
    await until(lambda: mirror.get(fresh[0]) is not None and mirror.get(lost[0]).state == "COMPLETED")
    for request_id in lost:
        snapshot = mirror.get(request_id)
        assert (snapshot.state, snapshot.error.error_type) == ("COMPLETED", "job_lost")
    assert (await store.get(lost[0])).error.error_type == "job_lost"  # every replica now agrees
    assert mirror.position(fresh[0]) == 0


async def test_a_quiet_job_the_store_no_longer_has_is_resolved_too() -> None:
    """A job lost without the store starting over (the last second of an `everysec` AOF, an eviction)."""
    store = JobStore.in_memory()
    mirror, _ = follow(store, audit_after_s=0.2)
    kept, lost = await submitted(store, 2)
    await until(lambda: mirror.get(lost) is not None)
    await store._redis.delete(f"sdxl:default:job:{lost}")
    await until(lambda: mirror.get(lost).state == "COMPLETED", timeout_s=3)
    assert mirror.get(lost).error.error_type == "job_lost"
    assert mirror.get(kept).state == "IN_QUEUE"


async def test_a_long_poll_returns_as_soon_as_something_changes() -> None:
    store = JobStore.in_memory()
    _, dispatcher = follow(store)
    await dispatcher.start()
    try:
        current = await dispatcher.changes("", 0, 0, timeout_s=0)
        waiting = asyncio.ensure_future(dispatcher.changes(current.epoch, current.version, current.queue_version, 10))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        (request_id,) = await submitted(store, 1)
        changes = await asyncio.wait_for(waiting, 2)  # the feed watcher sees the store's version move
        assert [job.request_id for job in changes.jobs] == [request_id]
    finally:
        await dispatcher.close()


async def test_finished_snapshots_expire_from_the_mirror() -> None:
    async def never(*args):
        await asyncio.sleep(3600)

    mirror = JobMirror(never, never, finished_ttl_s=0.01)
    mirror.remember(JobSnapshot(request_id="done", state="COMPLETED"))
    await asyncio.sleep(1.1)  # pruning runs at most once a second
    fresh = JobSnapshot(request_id="fresh", state="IN_QUEUE")
    mirror._apply(FeedChanges(epoch="e", version=1, queue_version=0, reset=False, jobs=[fresh], queued=None))
    assert mirror.get("done") is None and mirror.get("fresh") is not None
