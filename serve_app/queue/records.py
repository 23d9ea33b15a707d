"""A queued job as both stores keep it: a pydantic model that round-trips through JSON.

The job-queue deployment reads these to answer fal's queue API (status, logs, result) and to dispatch
work; the constructors below are the only errors a store makes itself.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from serve_app.contract.errors import Cancelled, ErrorBody, ReplicaFailed
from serve_app.contract.queue import JobState, LogEntry

CancelOutcome = Literal["unknown", "completed", "removed", "requested"]


class JobRecord(BaseModel):
    """One job from submission to completion; `request` is its `ResolvedRequest` as a dict."""

    request_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    app_id: str
    request: dict
    state: JobState = "IN_QUEUE"
    submitted_at: float = Field(default_factory=time.time, description="Unix seconds.")
    started_at: float | None = Field(default=None, description="Unix seconds of the current attempt's claim.")
    finished_at: float | None = None
    attempts: int = Field(default=0, description="Claims so far; a lease expiry re-queues until `max_attempts`.")
    logs: list[LogEntry] = Field(default_factory=list)
    result: dict | None = None
    error: ErrorBody | None = None
    inference_time: float | None = Field(default=None, description="Seconds spent generating.")
    webhook_url: str | None = None
    cancel_requested: bool = False


def cancelled_error() -> ErrorBody:
    return Cancelled("the job was cancelled before it started").body()


def cancelled_while_orphaned_error() -> ErrorBody:
    """A running job was cancelled, then its dispatcher died: no point in running it again."""
    return Cancelled("the job was cancelled while running and its replica stopped").body()


def replica_failed_error(max_attempts: int) -> ErrorBody:
    detail = f"the job-queue replica running the job stopped responding; gave up after {max_attempts} attempts"
    return ReplicaFailed(detail).body()
