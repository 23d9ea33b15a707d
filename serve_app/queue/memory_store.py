"""The default job store: plain dicts in the job-queue replica's process.

Same semantics as the Redis store within one process (jobs die with the replica). Each method is
atomic because none awaits: the replica's event loop runs it to the end before anything else.
Records handed out are copies, so callers cannot change the store's state behind its back.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass

from serve_app.contract.errors import ErrorBody
from serve_app.contract.queue import LogEntry
from serve_app.queue.records import (
    CancelOutcome,
    JobRecord,
    cancelled_error,
    cancelled_while_orphaned_error,
    replica_failed_error,
)
from serve_app.queue.store import DEFAULT_RESULT_TTL_S, DEFAULT_RETRY_AFTER_S, JobStore, QueueFull

# Re-queued jobs score below any fresh one (scores are submit sequence numbers) and keep their order.
REQUEUE_OFFSET = 2**50


@dataclass
class _Lease:
    owner: str
    expires_at: float  # time.monotonic()


class MemoryJobStore(JobStore):
    """Timestamps in records are `time.time()`; leases and retention use `time.monotonic()`."""

    def __init__(
        self,
        *,
        result_ttl_s: float = DEFAULT_RESULT_TTL_S,
        max_completed: int = 10_000,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    ) -> None:
        self._result_ttl_s = result_ttl_s
        self._max_completed = max_completed
        self._retry_after_s = retry_after_s
        self._sequence = itertools.count()
        self._records: dict[str, JobRecord] = {}
        self._seq: dict[str, int] = {}  # submit order, for re-queueing
        self._queue: list[tuple[int, str]] = []  # (score, id), sorted: head first
        self._scores: dict[str, int] = {}  # queued id -> its score in `_queue`
        self._leases: dict[str, _Lease] = {}
        self._completed: OrderedDict[str, float] = OrderedDict()  # id -> expiry, oldest first
        self._files: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()  # key -> (expiry, data, type)

    async def submit(self, record: JobRecord, max_queued: int) -> int:
        self._prune()
        if record.state != "IN_QUEUE" or record.request_id in self._records:
            raise ValueError(f"request {record.request_id} is not a fresh record")
        if len(self._queue) >= max_queued:
            raise QueueFull(self._retry_after_s)
        seq = next(self._sequence)
        self._records[record.request_id] = record.model_copy(deep=True)
        self._seq[record.request_id] = seq
        self._enqueue(record.request_id, seq)  # fresh scores only grow: the tail
        return len(self._queue) - 1

    async def get(self, request_id: str) -> JobRecord | None:
        self._prune()
        record = self._records.get(request_id)
        return None if record is None else record.model_copy(deep=True)

    async def position(self, request_id: str) -> int | None:
        score = self._scores.get(request_id)
        return None if score is None else bisect.bisect_left(self._queue, (score, request_id))

    async def queued_ids(self) -> list[str]:
        return [request_id for _, request_id in self._queue]

    async def claim(self, owner: str, lease_s: float) -> JobRecord | None:
        if not self._queue:
            return None
        _, request_id = self._queue.pop(0)
        del self._scores[request_id]
        record = self._records[request_id]
        record.state = "IN_PROGRESS"
        record.started_at = time.time()
        record.attempts += 1
        self._leases[request_id] = _Lease(owner, time.monotonic() + lease_s)
        return record.model_copy(deep=True)

    async def renew(self, request_id: str, owner: str, lease_s: float) -> bool:
        lease = self._leases.get(request_id)
        if lease is None or lease.owner != owner:
            return False
        lease.expires_at = time.monotonic() + lease_s
        return True

    async def append_logs(self, request_id: str, logs: list[LogEntry]) -> None:
        record = self._records.get(request_id)
        if record is not None and record.state != "COMPLETED":
            record.logs.extend(log.model_copy() for log in logs)

    async def finish(
        self,
        request_id: str,
        owner: str | None,
        *,
        result: dict | None = None,
        error: ErrorBody | None = None,
        inference_time: float | None = None,
    ) -> bool:
        record = self._records.get(request_id)
        if record is None or record.state == "COMPLETED":
            return False
        lease = self._leases.get(request_id)
        if owner is not None and (lease is None or lease.owner != owner):
            return False
        self._complete(record, result=result, error=error, inference_time=inference_time)
        return True

    async def cancel(self, request_id: str) -> CancelOutcome:
        record = self._records.get(request_id)
        if record is None:
            return "unknown"
        if record.state == "COMPLETED":
            return "completed"
        if record.state == "IN_PROGRESS":
            record.cancel_requested = True
            return "requested"
        self._complete(record, error=cancelled_error())
        return "removed"

    async def reclaim_expired(self, max_attempts: int) -> list[str]:
        now = time.monotonic()
        expired = sorted(
            (request_id for request_id, lease in self._leases.items() if lease.expires_at <= now),
            key=self._seq.__getitem__,
        )
        for request_id in expired:
            del self._leases[request_id]
            record = self._records[request_id]
            if record.cancel_requested:
                self._complete(record, error=cancelled_while_orphaned_error())
            elif record.attempts >= max_attempts:
                self._complete(record, error=replica_failed_error(max_attempts))
            else:
                record.state = "IN_QUEUE"
                record.started_at = None
                self._enqueue(request_id, self._seq[request_id] - REQUEUE_OFFSET)
        return expired

    async def running_ids(self) -> list[str]:
        return sorted(self._leases, key=lambda request_id: self._leases[request_id].expires_at)

    async def put_file(self, key: str, data: bytes, content_type: str) -> None:
        self._prune()
        self._files.pop(key, None)  # re-inserted at the end: the dict stays in expiry order
        self._files[key] = (time.monotonic() + self._result_ttl_s, bytes(data), content_type)

    async def get_file(self, key: str) -> tuple[bytes, str] | None:
        self._prune()
        entry = self._files.get(key)
        return None if entry is None else (entry[1], entry[2])

    async def close(self) -> None:
        pass

    def _complete(
        self,
        record: JobRecord,
        *,
        result: dict | None = None,
        error: ErrorBody | None = None,
        inference_time: float | None = None,
    ) -> None:
        request_id = record.request_id
        if request_id in self._scores:
            del self._queue[bisect.bisect_left(self._queue, (self._scores.pop(request_id), request_id))]
        self._leases.pop(request_id, None)
        record.state = "COMPLETED"
        record.finished_at = time.time()
        record.result = result
        record.error = error
        record.inference_time = inference_time
        self._completed[request_id] = time.monotonic() + self._result_ttl_s
        self._prune()

    def _enqueue(self, request_id: str, score: int) -> None:
        self._scores[request_id] = score
        bisect.insort(self._queue, (score, request_id))

    def _prune(self) -> None:
        """Forget expired completed jobs and files, and the oldest completed jobs beyond `max_completed`."""
        now = time.monotonic()
        while self._completed:
            request_id, expires_at = next(iter(self._completed.items()))
            if expires_at > now and len(self._completed) <= self._max_completed:
                break
            del self._completed[request_id]
            del self._records[request_id]
            del self._seq[request_id]
        while self._files and next(iter(self._files.values()))[0] <= now:
            self._files.popitem(last=False)
