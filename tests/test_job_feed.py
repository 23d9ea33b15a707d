"""The job status feed and its mirror: what an ingress replica knows without asking the job queue."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.contract.queue import LogEntry
from serve_app.queue.feed import JobFeed, JobMirror, JobSnapshot

pytestmark = pytest.mark.anyio


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


def snapshot(request_id: str, state: str = "IN_QUEUE", logs: int = 0) -> JobSnapshot:
    return JobSnapshot(
        request_id=request_id, state=state, logs=[LogEntry(message=f"line {i}", timestamp="t") for i in range(logs)]
    )


async def test_changes_are_what_changed_since_a_version_and_the_queue_order() -> None:
    feed = JobFeed(finished_ttl_s=60)
    feed.put(snapshot("a"))
    feed.put(snapshot("b"))
    feed.set_queue(["a", "b"])
    first = await feed.changes("", 0, timeout_s=0)
    assert first.reset and [job.request_id for job in first.jobs] == ["a", "b"] and first.queued == ["a", "b"]

    feed.put(snapshot("a", "IN_PROGRESS", logs=2))
    feed.set_queue(["b"])
    second = await feed.changes(first.epoch, first.version, timeout_s=0)
    assert not second.reset and [(job.request_id, job.state) for job in second.jobs] == [("a", "IN_PROGRESS")]
    assert second.queued == ["b"]

    nothing = await feed.changes(second.epoch, second.version, timeout_s=0.05)
    assert nothing.jobs == [] and nothing.queued is None and nothing.version == second.version


async def test_a_long_poll_returns_as_soon_as_something_changes() -> None:
    feed = JobFeed(finished_ttl_s=60)
    current = await feed.changes("", 0, timeout_s=0)
    waiting = asyncio.ensure_future(feed.changes(current.epoch, current.version, timeout_s=10))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    feed.put(snapshot("a"))
    changes = await asyncio.wait_for(waiting, 1)
    assert [job.request_id for job in changes.jobs] == ["a"]


async def test_a_restarted_job_queue_resets_the_mirror() -> None:
    """A new epoch (the job queue restarted): the mirror drops what it had and takes the new state."""
    feeds = [JobFeed(finished_ttl_s=60), JobFeed(finished_ttl_s=60)]
    feeds[0].put(snapshot("old"))
    feeds[1].put(snapshot("new"))
    feeds[1].set_queue(["new"])
    serving = {"feed": feeds[0]}

    async def fetch(epoch: str, since: int, timeout_s: float) -> dict:
        return (await serving["feed"].changes(epoch, since, min(timeout_s, 0.05))).model_dump()

    mirror = JobMirror(fetch, finished_ttl_s=60, poll_timeout_s=0.05)
    mirror.start()
    await mirror.wait_for_change(1)
    assert mirror.get("old") is not None
    serving["feed"] = feeds[1]
    for _ in range(20):
        await mirror.wait_for_change(0.1)
        if mirror.get("new"):
            break
    assert mirror.get("old") is None and mirror.position("new") == 0


async def test_finished_snapshots_expire() -> None:
    feed = JobFeed(finished_ttl_s=0.01)
    feed.put(snapshot("done", "COMPLETED"))
    await asyncio.sleep(1.1)  # pruning runs at most once a second
    feed.put(snapshot("fresh"))
    assert feed.get("done") is None and feed.get("fresh") is not None
