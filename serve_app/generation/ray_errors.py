"""Ray's exceptions as catalog errors: where the service calls another deployment over a handle."""

from __future__ import annotations

import logging

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from serve_app.contract.errors import Cancelled, InternalError, Overloaded, ReplicaFailed, ServiceError

logger = logging.getLogger("ray.serve")


def from_ray(error: BaseException) -> ServiceError:
    """A catalog error for what a handle call raised: the callee's own catalog error as it is, a full
    queue as `overloaded`, a call its caller cancelled as `cancelled`, a dead replica as
    `replica_failed`, anything else as `internal_error` (logged here with its text, which the client
    never reads)."""
    if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause  # raised in another replica: classify what was raised there
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, BackPressureError):
        return Overloaded(retry_after_s=error.retry_after_s)
    if isinstance(error, RequestCancelledError):  # the caller cancelled the call it then read
        return Cancelled("the generation was cancelled")
    if isinstance(error, RayActorError):
        logger.warning("A replica failed: %s", error)
        return ReplicaFailed()
    logger.error("A deployment call failed", exc_info=error)
    return InternalError()
