"""fal's queue: job records, the store behind them, and the job-queue deployment that dispatches them.

`open_job_store` picks the store's backend once at start-up: in this process by default (fakeredis:
the same scripts and caps; jobs die with the replica), Redis when a URL is given (jobs then survive
the job-queue replicas, and several of them share the queue).
"""

from __future__ import annotations

from serve_app.queue.records import CancelOutcome, JobRecord
from serve_app.queue.store import JobStore, QueueFull, StoreFull, StoreLimits, StoreUnavailable, key_prefix

__all__ = [
    "CancelOutcome",
    "JobRecord",
    "JobStore",
    "QueueFull",
    "StoreFull",
    "StoreLimits",
    "StoreUnavailable",
    "open_job_store",
]


def open_job_store(redis_url: str | None, *, app_id: str = "default", limits: StoreLimits | None = None) -> JobStore:
    """A Redis store keyed under `sdxl:{app_id}:` when `redis_url` is set, else one in this process."""
    if redis_url is None:
        return JobStore.in_memory(prefix=key_prefix(app_id), limits=limits)
    return JobStore.from_url(redis_url, prefix=key_prefix(app_id), limits=limits)
