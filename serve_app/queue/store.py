"""The job store contract, shared by the in-memory store (default) and the Redis store.

The job-queue deployment is the only writer. Every method is atomic: a claim hands a job to
exactly one owner, and `finish` completes a job exactly once, whoever calls it and however late.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from serve_app.contract.errors import ErrorBody, Overloaded
from serve_app.contract.queue import LogEntry
from serve_app.queue.records import CancelOutcome, JobRecord

DEFAULT_RESULT_TTL_S = 3600.0
DEFAULT_RETRY_AFTER_S = 5.0


class QueueFull(Overloaded):
    """`max_queued` jobs are already waiting; `retry_after_s` is a hint for the Retry-After header."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the job queue is full; retry later", retry_after_s=retry_after_s)


class JobStore(ABC):
    """Queue, leases and completed results of one app's jobs.

    Completed jobs (and stored files) are kept `result_ttl_s` seconds, then forgotten. Queued and
    running jobs never expire: a running job is leased, and `reclaim_expired` puts it back at the
    front of the queue when its owner stops renewing the lease.
    """

    @abstractmethod
    async def submit(self, record: JobRecord, max_queued: int) -> int:
        """Append a fresh record to the queue tail; its 0-based position. Raises `QueueFull`."""

    @abstractmethod
    async def get(self, request_id: str) -> JobRecord | None:
        """The record with its logs in order; None when unknown or expired."""

    @abstractmethod
    async def position(self, request_id: str) -> int | None:
        """0-based position while queued, else None."""

    @abstractmethod
    async def queued_ids(self) -> list[str]:
        """Queued ids, head first."""

    @abstractmethod
    async def claim(self, owner: str, lease_s: float) -> JobRecord | None:
        """Pop the queue head and mark it IN_PROGRESS, leased to `owner` for `lease_s`; None when empty."""

    @abstractmethod
    async def renew(self, request_id: str, owner: str, lease_s: float) -> bool:
        """Extend the lease to now + `lease_s`; False when the job is no longer leased to `owner`."""

    @abstractmethod
    async def append_logs(self, request_id: str, logs: list[LogEntry]) -> None:
        """Add log entries to a queued or running job; ignored once it completed."""

    @abstractmethod
    async def finish(
        self,
        request_id: str,
        owner: str | None,
        *,
        result: dict | None = None,
        error: ErrorBody | None = None,
        inference_time: float | None = None,
    ) -> bool:
        """Complete the job exactly once; False if already completed, unknown or leased to another owner.

        `owner=None` completes it whoever holds it (and removes it from the queue if it waits there).
        """

    @abstractmethod
    async def cancel(self, request_id: str) -> CancelOutcome:
        """Queued: "removed" (completed with the cancelled error); running: "requested" (the dispatcher
        reads `cancel_requested` and stops); "completed"; "unknown"."""

    @abstractmethod
    async def reclaim_expired(self, max_attempts: int) -> list[str]:
        """Running jobs whose lease expired go back to the queue front, in submit order among themselves,
        or complete with `replica_failed` once `attempts >= max_attempts` (cancelled if cancel was
        requested). Returns the affected ids in submit order."""

    @abstractmethod
    async def running_ids(self) -> list[str]:
        """Leased ids, soonest lease expiry first."""

    @abstractmethod
    async def put_file(self, key: str, data: bytes, content_type: str) -> None:
        """Store a result's file (an image) for `result_ttl_s`."""

    @abstractmethod
    async def get_file(self, key: str) -> tuple[bytes, str] | None:
        """(data, content_type), or None when unknown or expired."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
