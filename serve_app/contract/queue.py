"""fal's queue API on the wire: what submit, status, cancel and webhooks answer, as both fal clients
parse it. The result route answers a `GenerationResult` (or an `ErrorBody`)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field

JobState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
ANONYMOUS_OWNER = "anonymous"  # whose jobs everyone's are when the service has no API keys


class LogEntry(BaseModel):
    """One of fal's log objects."""

    message: str
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    source: Literal["USER"] = "USER"
    timestamp: str = Field(description="ISO 8601, UTC.")

    @classmethod
    def now(cls, message: str, level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO") -> LogEntry:
        timestamp = datetime.now(timezone.utc).isoformat()  # noqa: UP017 - Python 3.10 has no datetime.UTC
        return cls(message=message, level=level, timestamp=timestamp)


class JobUrls(BaseModel):
    """Absolute, through the host and scheme the client used (fal_client follows them as given)."""

    response_url: str
    status_url: str
    cancel_url: str


class QueueSubmitted(JobUrls):
    """`POST /queue/{app_id}`."""

    request_id: str
    status: Literal["IN_QUEUE"] = "IN_QUEUE"
    queue_position: int = Field(description="0-based: how many jobs are ahead of this one.")


class QueueMetrics(BaseModel):
    inference_time: float | None = Field(description="Seconds spent generating; null for a job that did not run.")


class QueueStatus(JobUrls):
    """`GET .../requests/{id}/status` (and each event of `/status/stream`). Fields that do not apply to
    the state are left out, except `logs`, which `fal_client` requires (null without `?logs=1`)."""

    status: JobState
    request_id: str
    queue_position: int | None = Field(default=None, description="IN_QUEUE only: jobs ahead of this one.")
    logs: list[LogEntry] | None = Field(description="With `?logs=1`: the job's logs; else null.")
    metrics: QueueMetrics | None = Field(default=None, description="COMPLETED only.")
    error: str | None = Field(default=None, description="COMPLETED with an error: its detail.")
    error_type: str | None = Field(default=None, description="COMPLETED with an error: its catalog type.")

    def wire(self) -> str:
        """The JSON clients read: the optional fields only where they apply (not null)."""
        absent = {name for name in ("queue_position", "metrics", "error", "error_type") if getattr(self, name) is None}
        return self.model_dump_json(exclude=absent)


class CancelAccepted(BaseModel):
    """`PUT .../requests/{id}/cancel`: 202."""

    status: Literal["CANCELLATION_REQUESTED"] = "CANCELLATION_REQUESTED"


class WebhookPayload(BaseModel):
    """fal's webhook body: OK with the result as `payload`, or ERROR with the error's body."""

    request_id: str
    gateway_request_id: str
    status: Literal["OK", "ERROR"]
    payload: dict | None
    error: str | None
