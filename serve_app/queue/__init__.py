"""fal's queue: job records, the stores behind them, and the job-queue deployment that dispatches them.

`open_job_store` picks the store once at start-up: in memory by default, Redis when a URL is
given (jobs then survive the job-queue replica). The Redis client is imported only then.
"""

from __future__ import annotations

from serve_app.queue.memory_store import MemoryJobStore
from serve_app.queue.records import CancelOutcome, JobRecord
from serve_app.queue.store import DEFAULT_RESULT_TTL_S, DEFAULT_RETRY_AFTER_S, JobStore, QueueFull

__all__ = [
    "CancelOutcome",
    "JobRecord",
    "JobStore",
    "MemoryJobStore",
    "QueueFull",
    "open_job_store",
]


def open_job_store(
    redis_url: str | None,
    *,
    app_id: str = "default",
    result_ttl_s: float = DEFAULT_RESULT_TTL_S,
    retry_after_s: float = DEFAULT_RETRY_AFTER_S,
) -> JobStore:
    """A Redis store keyed under `sdxl:{app_id}:` when `redis_url` is set, else an in-memory one."""
    if redis_url is None:
        return MemoryJobStore(result_ttl_s=result_ttl_s, retry_after_s=retry_after_s)
    from serve_app.queue.redis_store import RedisJobStore, key_prefix

    return RedisJobStore.from_url(
        redis_url, prefix=key_prefix(app_id), result_ttl_s=result_ttl_s, retry_after_s=retry_after_s
    )
