"""Job status, mirrored from the store into every ingress replica, so status polls stay local.

fal_client polls a job's status ten times a second. The store keeps a versioned feed of what changed
(`JobStore.changes`); each ingress replica's `JobMirror` follows it through the job queue with one long
poll at a time and answers status polls from its own memory, never calling another deployment per
poll. The store's epoch and versions are the same whichever job-queue replica answers; a new epoch (the
store started over) or a mirror too far behind resets the mirror. The store is the truth: unfinished
jobs the mirror has heard nothing of for a while are checked (`audit`), so a job the store lost is
answered as the store answers it, and nobody polls it for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from serve_app.queue.store import FeedChanges, JobSnapshot
from serve_app.waiting import wait_event

logger = logging.getLogger("ray.serve")

MAX_SNAPSHOTS = 5_000  # with up to 50 log lines each: tens of MB at most; older ones are read from the store
AUDIT_AFTER_S = 5.0  # an unfinished job unchanged this long is checked against the store
AUDIT_BATCH = 100

FetchChanges = Callable[[str, int, int, float], Awaitable[FeedChanges]]
Audit = Callable[[list[JobSnapshot]], Awaitable[list[JobSnapshot]]]


class Retention:
    """Finished snapshots are kept `ttl_s` (the store keeps the records as long, or less past its caps),
    and at most `MAX_SNAPSHOTS` in all; pruning runs at most once a second."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._pruned_at = 0.0

    def prune(self, jobs: dict[str, JobSnapshot], finished_at: dict[str, float]) -> list[str]:
        """Drop expired finished snapshots (and the oldest finished beyond the cap); the ids dropped."""
        now = time.monotonic()
        if now - self._pruned_at < 1.0 and len(jobs) <= MAX_SNAPSHOTS:
            return []
        self._pruned_at = now
        excess = len(jobs) - MAX_SNAPSHOTS
        dropped = []
        for request_id in list(jobs):
            finished = finished_at.get(request_id)
            if finished is not None and (excess > 0 or finished < now - self._ttl_s):
                del jobs[request_id]
                del finished_at[request_id]
                dropped.append(request_id)
                excess -= 1
        return dropped


class JobMirror:
    """An ingress replica's copy of the feed; `start` follows it for the replica's lifetime."""

    def __init__(
        self,
        fetch: FetchChanges,
        audit: Audit,
        finished_ttl_s: float,
        poll_timeout_s: float = 10.0,
        audit_after_s: float = AUDIT_AFTER_S,
        lease_s: float = 15.0,
    ) -> None:
        """A running job is audited only once quiet past a lease as well: after the store lost it, its run
        puts it back at its next renewal (every third of a lease), on whichever job-queue replica runs it."""
        self._fetch = fetch  # the job queue's `changes`, over its handle
        self._audit = audit  # the job queue's `audit`
        self._poll_timeout_s = poll_timeout_s
        self._audit_after_s = audit_after_s
        self._running_quiet_s = audit_after_s + lease_s
        self._retention = Retention(finished_ttl_s)
        self._epoch = ""
        self._version = 0
        self._queue_version = 0
        self._jobs: dict[str, JobSnapshot] = {}
        self._heard: dict[str, float] = {}  # id -> monotonic time of its last change
        self._finished: dict[str, float] = {}  # id -> monotonic time it was first seen finished
        self._positions: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._follow()), loop.create_task(self._check_quiet_jobs())]

    def get(self, request_id: str) -> JobSnapshot | None:
        return self._jobs.get(request_id)

    def position(self, request_id: str) -> int | None:
        return self._positions.get(request_id)

    def remember(self, snapshot: JobSnapshot, position: int | None = None) -> None:
        """A snapshot learned first-hand (a submit through this replica, a read from the store), before
        the feed brings it."""
        if snapshot.request_id not in self._jobs:
            self._put(snapshot)
        if position is not None:
            self._positions.setdefault(snapshot.request_id, position)

    def changed_event(self) -> asyncio.Event:
        """Set at the next applied change (a fresh event after each)."""
        return self._changed

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return after the next applied change, or after `timeout_s`."""
        await wait_event(self._changed, timeout_s)

    async def _follow(self) -> None:
        while True:
            try:
                changes = await self._fetch(self._epoch, self._version, self._queue_version, self._poll_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the job queue restarts or redeploys; keep following
                logger.warning("Following the job queue failed (%s); retrying", error)
                await asyncio.sleep(1.0)
                continue
            self._apply(FeedChanges.model_validate(changes))

    def _apply(self, changes: FeedChanges) -> None:
        if changes.reset:
            # The store started over (or this mirror fell behind): nothing held may be trusted. Unfinished
            # jobs it does not list again are checked after `audit_after_s`: the store may have lost them,
            # and runs put back the jobs they hold within a lease, so those are not taken for lost.
            listed = {snapshot.request_id for snapshot in changes.jobs}
            unfinished = [s for s in self._jobs.values() if s.state != "COMPLETED" and s.request_id not in listed]
            self._jobs.clear()
            self._heard.clear()
            self._finished.clear()
            self._positions.clear()
            for snapshot in unfinished:
                self._put(snapshot)
        self._epoch, self._version, self._queue_version = changes.epoch, changes.version, changes.queue_version
        for snapshot in changes.jobs:
            self._put(snapshot)
        if changes.queued is not None:
            self._positions = {request_id: index for index, request_id in enumerate(changes.queued)}
        for request_id in self._retention.prune(self._jobs, self._finished):
            self._heard.pop(request_id, None)
        self._notify()

    async def _check_quiet_jobs(self) -> None:
        """Every few seconds: unfinished jobs unchanged for `audit_after_s`, checked against the store."""
        while True:
            await asyncio.sleep(self._audit_after_s / 2)
            now = time.monotonic()
            quiet = [
                snapshot
                for request_id, snapshot in self._jobs.items()
                if snapshot.state != "COMPLETED"
                and self._heard.get(request_id, 0.0)
                < now - (self._running_quiet_s if snapshot.state == "IN_PROGRESS" else self._audit_after_s)
            ][:AUDIT_BATCH]
            if not quiet:
                continue
            try:
                answers = await self._audit(quiet)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the job queue or the store is away: check later
                logger.warning("Checking quiet jobs against the store failed (%s); retrying", error)
                continue
            found = {snapshot.request_id for snapshot in answers}
            for snapshot in answers:
                self._put(snapshot)
            for snapshot in quiet:
                if snapshot.request_id not in found:  # unknown to the store: answered as unknown from now on
                    self._forget(snapshot.request_id)
            self._notify()

    def _put(self, snapshot: JobSnapshot) -> None:
        request_id = snapshot.request_id
        self._jobs.pop(request_id, None)  # re-inserted last: the dict stays in change order
        self._jobs[request_id] = snapshot
        self._heard[request_id] = time.monotonic()
        if snapshot.state == "COMPLETED":
            self._finished.setdefault(request_id, time.monotonic())
            self._positions.pop(request_id, None)

    def _forget(self, request_id: str) -> None:
        for held in (self._jobs, self._heard, self._finished, self._positions):
            held.pop(request_id, None)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # waiters hold the old one, already set
