"""Every failure a client can see, in one catalog: each class carries its `error_type` and HTTP status.

Raise these inside the service; `classify` turns any other exception into one of them, and the edges
render the one body shape `{"detail", "error_type"}` as a JSON response (`ServiceError.response`) or
as an SSE `error` event (`serve_app.sse.error_event`). Adding an error type touches this module only.
"""

from __future__ import annotations

import sys
from typing import ClassVar

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.responses import JSONResponse

from serve_app.schemas import ErrorBody


class ServiceError(Exception):
    """A failure with a client-facing type and status; `detail` is what the client reads."""

    error_type: ClassVar[str] = "internal_error"
    status_code: ClassVar[int] = 500
    default_detail: ClassVar[str] = "internal error"
    fatal: ClassVar[bool] = False  # the replica that raised it can serve nothing more

    def __init__(self, detail: str | list | None = None) -> None:
        self.detail = detail if detail is not None else self.default_detail
        super().__init__(self.detail if isinstance(self.detail, str) else self.error_type)

    def __reduce__(self):
        """Pickle by state, not by `args`: subclasses take other constructor arguments (Ray pickles
        an error raised in one replica to re-raise it in its caller)."""
        return (_rebuild, (type(self), self.__dict__))

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> ErrorBody:
        return ErrorBody(detail=self.detail, error_type=self.error_type)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status_code, headers=self.headers() or None)


def _rebuild(cls: type[ServiceError], state: dict) -> ServiceError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("detail"))
    error.__dict__.update(state)
    return error


class InternalError(ServiceError):
    pass


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


class Overloaded(ServiceError):
    error_type = "overloaded"
    status_code = 503
    default_detail = "all replicas are busy and the queue is full; retry later"

    def __init__(self, detail: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s or 1)))}


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


class TooManyRequests(ServiceError):
    """The client already has `max_generations_per_client` generations in flight."""

    error_type = "too_many_requests"
    status_code = 429
    default_detail = "too many generations in flight for this client; retry later"

    def __init__(self, detail: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s or 1)))}


class GenerationCancelled(Exception):
    """The client went away; raised inside the pipeline to stop denoising at the next step. Not an error."""


CATALOG: dict[str, type[ServiceError]] = {
    cls.error_type: cls
    for cls in (
        InternalError,
        ValidationFailed,
        Unauthorized,
        RequestTooLarge,
        NotFound,
        MethodNotAllowed,
        HttpError,
        Overloaded,
        NotReady,
        QueueTimeout,
        DeadlineExceeded,
        OutOfMemory,
        DeviceError,
        ReplicaFailed,
        GenerationFailed,
        Cancelled,
        NotCompleted,
        AlreadyCompleted,
        WebhookNotAllowed,
        RequestTimeout,
        HeadersTooLarge,
        HostNotAllowed,
        TooManyRequests,
    )
}


def from_body(body: ErrorBody) -> ServiceError:
    """The catalog error an error body or event names (from another process), `internal_error` if unknown."""
    return CATALOG.get(body.error_type, InternalError)(body.detail)


def classify(error: BaseException, fallback: type[ServiceError] = InternalError) -> ServiceError:
    """Any exception as a catalog error: ours as they are, Ray's and torch's by what they mean, the rest
    as `fallback` (the pipeline passes `GenerationFailed`).

    torch is consulted only where it is already loaded (the model replicas; never the ingress).
    Out-of-memory is checked first: cuBLAS and some kernels report it as a generic CUDA error.
    """
    if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause  # raised in another replica: classify what was raised there
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, BackPressureError):
        return Overloaded(retry_after_s=error.retry_after_s)
    if isinstance(error, RayActorError):
        return ReplicaFailed()
    torch = sys.modules.get("torch")
    if torch is not None:
        message = str(error)
        if isinstance(error, torch.OutOfMemoryError) or any(sign in message for sign in OUT_OF_MEMORY_SIGNS):
            return OutOfMemory()
        accelerator_error = getattr(torch, "AcceleratorError", ())
        if isinstance(error, accelerator_error) or (isinstance(error, RuntimeError) and "CUDA error" in message):
            return DeviceError(f"device error: {error}")
    return fallback(f"{type(error).__name__}: {error}")


OUT_OF_MEMORY_SIGNS = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory", "CUDA out of memory")
