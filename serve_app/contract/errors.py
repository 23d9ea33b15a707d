"""Every failure a client can see, in one catalog: each class carries its `error_type` and HTTP status.

Raise these inside the service. A class that names an `error_type` registers itself (`CATALOG`), so
adding an error type is one class here. The one wire shape is `ErrorBody` (`{"detail", "error_type"}`):
the HTTP layer renders it as a JSON response or an SSE `error` event, the job store keeps it, and
`from_body` turns it back into its class in another process. Exceptions from Ray and torch are
classified where they are caught (`serve_app.generation.ray_errors`, `deployments.failures`).

The `detail` a client reads is the catalog's message or one the service wrote for the client, never
an exception's text: that goes to the logs, with the request id.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """The one error shape: HTTP error bodies, SSE `error` events, a failed job's error."""

    detail: str | list
    error_type: str


CATALOG: dict[str, type[ServiceError]] = {}


class ServiceError(Exception):
    """A failure with a client-facing type and status; `detail` is what the client reads.

    Subclasses that set `error_type` in their body join the catalog; those that do not (a more
    specific raise site, e.g. `QueueFull`) share their parent's type.
    """

    error_type: ClassVar[str]
    status_code: ClassVar[int] = 500
    default_detail: ClassVar[str] = "internal error"
    fatal: ClassVar[bool] = False  # the replica that raised it can serve nothing more
    retryable: ClassVar[bool] = False  # the same request may succeed elsewhere (another replica)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        error_type = cls.__dict__.get("error_type")
        if error_type is None:
            return
        if error_type in CATALOG:
            raise TypeError(f"error_type {error_type!r} is already {CATALOG[error_type].__name__}'s")
        CATALOG[error_type] = cls

    def __init__(self, detail: str | list | None = None) -> None:
        self.detail = detail if detail is not None else self.default_detail
        super().__init__(self.detail if isinstance(self.detail, str) else self.error_type)

    def __reduce__(self):
        """Pickle by state, not by `args`: subclasses take other constructor arguments (Ray pickles
        an error raised in one replica to re-raise it in its caller)."""
        return (_rebuild, (type(self), self.__dict__))

    def headers(self) -> dict[str, str]:
        """HTTP headers that belong with this error (e.g. `Retry-After`)."""
        return {}

    def body(self) -> ErrorBody:
        return ErrorBody(detail=self.detail, error_type=self.error_type)


def _rebuild(cls: type[ServiceError], state: dict) -> ServiceError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("detail"))
    error.__dict__.update(state)
    return error


class _RetryAfter:
    """Mixin for rejections that tell the client when to come back."""

    retry_after_s: float | None

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s or 1)))}


class InternalError(ServiceError):
    error_type = "internal_error"


class ValidationFailed(ServiceError):
    error_type = "validation_error"
    status_code = 422
    default_detail = "the request is not valid"


class Unauthorized(ServiceError):
    error_type = "unauthorized"
    status_code = 401
    default_detail = "missing or invalid API key: send `Authorization: Key <key>`"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Key"}


class RequestTooLarge(ServiceError):
    error_type = "request_too_large"
    status_code = 413
    default_detail = "the request body is too large"


class NotFound(ServiceError):
    error_type = "not_found"
    status_code = 404
    default_detail = "Not Found"


class MethodNotAllowed(ServiceError):
    error_type = "method_not_allowed"
    status_code = 405
    default_detail = "Method Not Allowed"


class HttpError(ServiceError):
    """Any other HTTP-level rejection (Starlette's `HTTPException`), with the status it came with."""

    error_type = "http_error"
    status_code = 400

    def __init__(self, detail: str | None = None, status_code: int = 400) -> None:
        super().__init__(detail)
        self.status_code = status_code  # type: ignore[misc]  # per instance: it is whatever Starlette chose


class Overloaded(_RetryAfter, ServiceError):
    error_type = "overloaded"
    status_code = 503
    default_detail = "all replicas are busy and the queue is full; retry later"

    def __init__(self, detail: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class NotReady(ServiceError):
    error_type = "not_ready"
    status_code = 503
    default_detail = "the model is not loaded yet"


class QueueTimeout(ServiceError):
    error_type = "queue_timeout"
    status_code = 503
    default_detail = "no model replica took the request in time"


class DeadlineExceeded(ServiceError):
    error_type = "deadline_exceeded"
    status_code = 504
    default_detail = "the request ran past its time limit"


class StartTimeout(ServiceError):
    """The client's `X-Fal-Request-Timeout` passed before its request started (the queue included): it
    never ran. As fal answers it: 504 with `X-Fal-Request-Timeout-Type: user`, which fal's clients do not
    retry."""

    error_type = "start_timeout"
    status_code = 504
    default_detail = "the request did not start within its X-Fal-Request-Timeout"

    def headers(self) -> dict[str, str]:
        return {"X-Fal-Request-Timeout-Type": "user"}


class OutOfMemory(ServiceError):
    """Recoverable: the allocator frees on unwind, so the replica keeps serving."""

    error_type = "out_of_memory"
    status_code = 503
    default_detail = "the GPU ran out of memory"


class DeviceError(ServiceError):
    """The CUDA context is gone for good: the replica fails its health check and Serve replaces it."""

    error_type = "device_error"
    status_code = 500
    default_detail = "device error"
    fatal = True


class ReplicaFailed(ServiceError):
    error_type = "replica_failed"
    status_code = 502
    default_detail = "the model replica serving this request failed"
    retryable = True


class GenerationFailed(ServiceError):
    error_type = "generation_failed"
    status_code = 500
    default_detail = "the generation failed"


class Cancelled(ServiceError):
    """A queued job the client cancelled: its result is this error."""

    error_type = "cancelled"
    status_code = 400  # not 408/409/429/5xx: both fal clients retry those
    default_detail = "the job was cancelled"


class NotCompleted(ServiceError):
    error_type = "not_completed"
    status_code = 400
    default_detail = "the job has not completed yet: poll its status_url"


class AlreadyCompleted(ServiceError):
    error_type = "already_completed"
    status_code = 400
    default_detail = "the job has already completed"


class QueueUnavailable(_RetryAfter, ServiceError):
    """The job store did not answer in time (Redis restarting, paused, unreachable): nothing was stored."""

    error_type = "queue_unavailable"
    status_code = 503
    default_detail = "the job queue is briefly unavailable; retry later"

    def __init__(self, detail: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class JobLost(ServiceError):
    """A job the queue accepted is gone from its store (a restart without persistence, a flush): it will
    not run. 410, not 5xx: the same result would come back on a retry; submit it again."""

    error_type = "job_lost"
    status_code = 410
    default_detail = "the job queue lost this job after accepting it; submit it again"


class WebhookNotAllowed(ServiceError):
    error_type = "webhook_not_allowed"
    status_code = 400
    default_detail = "this service does not call that webhook"


class RequestTimeout(ServiceError):
    """The body did not arrive in time: a stalled or trickled upload holds nothing past its deadline."""

    error_type = "request_timeout"
    status_code = 408
    default_detail = "the request body did not arrive in time"


class HeadersTooLarge(ServiceError):
    error_type = "headers_too_large"
    status_code = 431
    default_detail = "the request's headers are too large"


class HostNotAllowed(ServiceError):
    """A `Host` the service does not answer for: e.g. a DNS-rebinding page driving a loopback service."""

    error_type = "host_not_allowed"
    status_code = 400
    default_detail = "this service does not answer for that Host"


class TooManyRequests(_RetryAfter, ServiceError):
    """The client already has `max_generations_per_client` generations in flight."""

    error_type = "too_many_requests"
    status_code = 429
    default_detail = "too many generations in flight for this client; retry later"

    def __init__(self, detail: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class GenerationCancelled(Exception):
    """The client went away; raised inside the pipeline to stop denoising at the next step. Not an error."""


def from_body(body: ErrorBody) -> ServiceError:
    """The catalog error an error body names (from another process), `internal_error` if unknown."""
    return CATALOG.get(body.error_type, InternalError)(body.detail)


def as_service_error(error: BaseException, fallback: type[ServiceError] = InternalError) -> ServiceError:
    """A catalog error as it is; anything else as `fallback` with the catalog's message (the exception's
    own text may name hosts, paths or internals: the caller logs it, the client never reads it)."""
    if isinstance(error, ServiceError):
        return error
    return fallback()
