"""A queued job as the store keeps it: a pydantic model that round-trips through the store's hash.

The job-queue deployment reads these to answer fal's queue API (status, logs, result) and to dispatch
work; the constructors below are the errors the store writes itself.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from serve_app.contract.errors import Cancelled, ErrorBody, ReplicaFailed
from serve_app.contract.queue import ANONYMOUS_OWNER, JobState, LogEntry

CancelOutcome = Literal["unknown", "completed", "removed", "requested"]


class JobRecord(BaseModel):
    """One job from submission to completion; `request` is its `ResolvedRequest` as a dict (None once a
    job cancelled before it started keeps only its status)."""

    request_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    app_id: str
    owner: str = Field(default=ANONYMOUS_OWNER, description="A hash of the API key that submitted it.")
    request: dict | None = None
    state: JobState = "IN_QUEUE"
    priority: int = Field(default=0, description="0 normal, 1 low: a low job waits behind every normal one.")
    submitted_at: float = Field(default_factory=time.time, description="Unix seconds.")
    deadline: float | None = Field(
        default=None, description="Unix seconds by which it must start (X-Fal-Request-Timeout), else it never runs."
    )
    started_at: float | None = Field(default=None, description="Unix seconds of the current attempt's claim.")
    finished_at: float | None = None
    attempts: int = Field(default=0, description="Claims so far: the current one's fencing token.")
    generating: bool = Field(default=False, description="A model replica took the current attempt.")
    logs: list[LogEntry] = Field(default_factory=list)
    result: dict | None = None
    error: ErrorBody | None = None
    inference_time: float | None = Field(default=None, description="Seconds spent generating.")
    webhook_url: str | None = None
    base_url: str | None = Field(
        default=None, description="The service's address as its client called it: where `/files/...` URLs are."
    )
    keep_files_s: float | None = Field(
        default=None, description="Seconds its images are kept (X-Fal-Object-Lifecycle-Preference); None: no end."
    )
    cancel_requested: bool = False
    input_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Its input images (`image`, `mask`) in the object store: never in the record itself.",
    )


def cancelled_error() -> ErrorBody:
    return Cancelled("the job was cancelled before it started").body()


def cancelled_while_orphaned_error() -> ErrorBody:
    """A running job was cancelled, then its job-queue replica died: no point in running it again."""
    return Cancelled("the job was cancelled while running and its replica stopped").body()


def replica_failed_error(max_attempts: int, which: Literal["model", "job-queue"]) -> ErrorBody:
    detail = f"the {which} replica running the job failed; gave up after {max_attempts} attempts"
    return ReplicaFailed(detail).body()
