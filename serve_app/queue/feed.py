"""Job status, pushed from the job-queue replica to every ingress replica, so polls stay local.

fal_client polls a job's status ten times a second. The job queue keeps a versioned `JobFeed` of
job snapshots; each ingress replica's `JobMirror` follows it with one long poll at a time and
answers status polls from its own memory, never calling another deployment per poll. A restarted
job queue starts a new `epoch`, and mirrors then resynchronise from scratch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from pydantic import BaseModel

from serve_app.contract.errors import ErrorBody
from serve_app.contract.queue import JobState, LogEntry
from serve_app.queue.records import JobRecord

logger = logging.getLogger("ray.serve")

MAX_SNAPSHOTS = 5_000  # with up to 50 log lines each: tens of MB at most; older ones are read from the store


class JobSnapshot(BaseModel):
    """What a status poll needs to know about one job (its result stays in the store)."""

    request_id: str
    state: JobState
    logs: list[LogEntry] = []
    inference_time: float | None = None
    error: ErrorBody | None = None
    finished_at: float | None = None  # time.monotonic() of the process that holds the snapshot

    @classmethod
    def of(cls, record: JobRecord, state: JobState | None = None) -> JobSnapshot:
        return cls(
            request_id=record.request_id,
            state=state or record.state,
            logs=record.logs,
            inference_time=record.inference_time,
            error=record.error,
        )


class FeedChanges(BaseModel):
    """One answer to a mirror's long poll: snapshots changed since its version, and the queue order."""

    epoch: str
    version: int
    reset: bool  # the mirror must drop what it has: a new epoch, or it fell too far behind
    jobs: list[JobSnapshot]
    queued: list[str] | None  # ids in queue order, when it changed


class JobFeed:
    """The job queue's side: every change bumps the version and wakes the mirrors' long polls."""

    def __init__(self, finished_ttl_s: float) -> None:
        self.epoch = uuid.uuid4().hex
        self._version = 0
        self._jobs: dict[str, JobSnapshot] = {}  # in the order of their last change
        self._versions: dict[str, int] = {}
        self._queued: list[str] = []
        self._queued_version = 0
        self._retention = Retention(finished_ttl_s)
        self._changed = asyncio.Event()

    def get(self, request_id: str) -> JobSnapshot | None:
        return self._jobs.get(request_id)

    def put(self, snapshot: JobSnapshot) -> None:
        self._version += 1
        self._jobs.pop(snapshot.request_id, None)  # re-inserted last: the dict stays in change order
        self._jobs[snapshot.request_id] = self._retention.stamp(snapshot)
        self._versions[snapshot.request_id] = self._version
        for request_id in self._retention.prune(self._jobs):
            del self._versions[request_id]
        self._notify()

    def queued(self) -> list[str]:
        return self._queued

    def set_queue(self, queued: list[str]) -> None:
        if queued != self._queued:
            self._version += 1
            self._queued, self._queued_version = queued, self._version
            self._notify()

    async def changes(self, epoch: str, since: int, timeout_s: float) -> FeedChanges:
        """Changes after version `since` of `epoch`, waiting up to `timeout_s` for one to happen."""
        reset = epoch != self.epoch
        if not reset and self._version <= since:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        since = 0 if reset else since
        jobs = []
        for request_id in reversed(self._jobs):  # newest change first; stop at the first already sent
            if self._versions[request_id] <= since:
                break
            jobs.append(self._jobs[request_id])
        queued = self._queued if reset or self._queued_version > since else None
        return FeedChanges(epoch=self.epoch, version=self._version, reset=reset, jobs=jobs[::-1], queued=queued)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # waiters hold the old one, already set


class Retention:
    """Finished snapshots are kept `ttl_s` (the store keeps the records as long), and at most
    `MAX_SNAPSHOTS` in all; pruning runs at most once a second."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._pruned_at = 0.0

    def stamp(self, snapshot: JobSnapshot) -> JobSnapshot:
        if snapshot.state == "COMPLETED" and snapshot.finished_at is None:
            return snapshot.model_copy(update={"finished_at": time.monotonic()})
        return snapshot

    def prune(self, jobs: dict[str, JobSnapshot]) -> list[str]:
        """Drop expired finished snapshots (and the oldest finished beyond the cap); the ids dropped."""
        now = time.monotonic()
        if now - self._pruned_at < 1.0 and len(jobs) <= MAX_SNAPSHOTS:
            return []
        self._pruned_at = now
        excess = len(jobs) - MAX_SNAPSHOTS
        dropped = []
        for request_id, snapshot in list(jobs.items()):
            if snapshot.finished_at is not None and (excess > 0 or snapshot.finished_at < now - self._ttl_s):
                del jobs[request_id]
                dropped.append(request_id)
                excess -= 1
        return dropped


class JobMirror:
    """An ingress replica's copy of the feed; `follow` runs for the replica's lifetime."""

    def __init__(
        self, fetch: Callable[[str, int, float], Awaitable[dict]], finished_ttl_s: float, poll_timeout_s: float = 10.0
    ) -> None:
        self._fetch = fetch  # the job queue's `changes`, over its handle
        self._poll_timeout_s = poll_timeout_s
        self._retention = Retention(finished_ttl_s)
        self._epoch = ""
        self._version = 0
        self._jobs: dict[str, JobSnapshot] = {}
        self._positions: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    def get(self, request_id: str) -> JobSnapshot | None:
        return self._jobs.get(request_id)

    def position(self, request_id: str) -> int | None:
        return self._positions.get(request_id)

    def remember(self, snapshot: JobSnapshot, position: int | None = None) -> None:
        """A snapshot learned first-hand (a submit through this replica), before the feed brings it."""
        self._jobs.setdefault(snapshot.request_id, self._retention.stamp(snapshot))
        if position is not None:
            self._positions.setdefault(snapshot.request_id, position)

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return after the next applied change, or after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    async def _follow(self) -> None:
        while True:
            try:
                changes = FeedChanges.model_validate(
                    await self._fetch(self._epoch, self._version, self._poll_timeout_s)
                )
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the job queue restarts or redeploys; keep following
                logger.warning("Following the job queue failed (%s); retrying", error)
                await asyncio.sleep(1.0)
                continue
            self._apply(changes)

    def _apply(self, changes: FeedChanges) -> None:
        if changes.reset:
            self._jobs.clear()
            self._positions.clear()
        self._epoch, self._version = changes.epoch, changes.version
        for snapshot in changes.jobs:
            self._jobs.pop(snapshot.request_id, None)
            self._jobs[snapshot.request_id] = self._retention.stamp(snapshot.model_copy(update={"finished_at": None}))
        if changes.queued is not None:
            self._positions = {request_id: index for index, request_id in enumerate(changes.queued)}
        self._retention.prune(self._jobs)
        self._changed.set()
        self._changed = asyncio.Event()  # waiters hold the old one, already set
