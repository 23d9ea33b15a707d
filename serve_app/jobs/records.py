"""A queued job as both stores keep it: pydantic models that round-trip through JSON.

The job-queue deployment reads these to answer fal's queue API (status, logs, result) and
to dispatch work; the two error constructors below are the only errors a store makes itself.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from serve_app.errors import Cancelled, ReplicaFailed, ServiceError, from_body
from serve_app.schemas import ErrorBody

JobState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
CancelOutcome = Literal["unknown", "completed", "removed", "requested"]


class JobError(BaseModel):
    """Why a job completed without a result, in fal's error shape plus the HTTP status to answer with."""

    detail: str
    error_type: str
    status_code: int

    @classmethod
    def of(cls, error: ServiceError) -> JobError:
        return cls(detail=str(error.detail), error_type=error.error_type, status_code=error.status_code)

    def to_service_error(self) -> ServiceError:
        return from_body(ErrorBody(detail=self.detail, error_type=self.error_type))


class JobRecord(BaseModel):
    """One job from submission to completion; `request` is the validated generation request as a dict."""

    request_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    app_id: str
    request: dict
    state: JobState = "IN_QUEUE"
    submitted_at: float = Field(default_factory=time.time, description="Unix seconds.")
    started_at: float | None = Field(default=None, description="Unix seconds of the current attempt's claim.")
    finished_at: float | None = None
    attempts: int = Field(default=0, description="Claims so far; a lease expiry re-queues until `max_attempts`.")
    logs: list[dict] = Field(default_factory=list, description="fal log objects: message, level, source, timestamp.")
    result: dict | None = None
    error: JobError | None = None
    inference_time: float | None = Field(default=None, description="Seconds spent generating.")
    webhook_url: str | None = None
    cancel_requested: bool = False


def cancelled_error() -> JobError:
    return JobError.of(Cancelled("the job was cancelled before it started"))


def cancelled_while_orphaned_error() -> JobError:
    """A running job was cancelled, then its dispatcher died: no point in running it again."""
    return JobError.of(Cancelled("the job was cancelled while running and its replica stopped"))


def replica_failed_error(max_attempts: int) -> JobError:
    detail = f"the job-queue replica running the job stopped responding; gave up after {max_attempts} attempts"
    return JobError.of(ReplicaFailed(detail))
