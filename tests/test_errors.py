"""The error catalog: every failure's type and status, one body shape, how Ray's and torch's exceptions
are classified where they are caught, and the documented failure table."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from deployments.failures import classify
from serve_app.contract.errors import (
    CATALOG,
    DeviceError,
    ErrorBody,
    GenerationFailed,
    InternalError,
    OutOfMemory,
    Overloaded,
    ReplicaFailed,
    ServiceError,
    StartTimeout,
    Unauthorized,
    as_service_error,
    from_body,
)
from serve_app.generation.ray_errors import from_ray
from serve_app.http.errors import error_response
from tests.integration.harness import REPO

FAILURE_TABLE = REPO / "docs" / "failures.md"


def documented_failure_table() -> dict[str, int]:
    """`error_type` -> HTTP status, from the failure table in docs/failures.md."""
    rows = {}
    for line in FAILURE_TABLE.read_text().splitlines():
        match = re.fullmatch(r"\|.*\| (\d{3}) \| `([a-z_]+)` \|", line)
        if match:
            rows[match.group(2)] = int(match.group(1))
    return rows


def test_the_documented_table_is_the_catalog() -> None:
    table = documented_failure_table()
    assert table == {error_type: cls.status_code for error_type, cls in CATALOG.items() if error_type != "http_error"}


def test_an_error_type_is_one_class_that_registers_itself() -> None:
    class TeapotError(ServiceError):
        error_type = "test_teapot"
        status_code = 418

    try:
        assert CATALOG["test_teapot"] is TeapotError
        assert type(from_body(ErrorBody(detail="short and stout", error_type="test_teapot"))) is TeapotError
        with pytest.raises(TypeError, match="already"):
            type("AnotherTeapot", (ServiceError,), {"error_type": "test_teapot"})
    finally:
        del CATALOG["test_teapot"]


def test_every_error_renders_the_one_body_shape() -> None:
    for error_type, cls in CATALOG.items():
        response = error_response(cls())
        assert response.status_code == cls.status_code
        assert response.body.startswith(b'{"detail":')
        assert ErrorBody.model_validate_json(response.body).error_type == error_type


def test_headers_travel_with_their_error() -> None:
    assert error_response(StartTimeout()).headers["x-fal-request-timeout-type"] == "user"
    assert error_response(Unauthorized()).headers["x-fal-error-type"] == "unauthorized"  # on every error answer
    assert error_response(Overloaded(retry_after_s=3.4)).headers["retry-after"] == "3"
    assert error_response(Overloaded()).headers["retry-after"] == "1"
    assert error_response(Unauthorized()).headers["www-authenticate"] == "Key"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), OutOfMemory),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), OutOfMemory),
        (RuntimeError("CUDA error: out of memory"), OutOfMemory),  # not the allocator's, still recoverable
        (RuntimeError("CUDA error: an illegal memory access was encountered"), GenerationFailed),  # no probe: CPU
        (ValueError("bad shapes"), GenerationFailed),
        (RuntimeError("expected scalar type Half but found Float"), GenerationFailed),
    ],
)
def test_the_model_side_classifies_torch_failures(error: BaseException, expected: type) -> None:
    assert type(classify(error)) is expected


def dead_probe() -> None:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize(
    ("error", "probe", "expected"),
    [
        (RuntimeError("CUDA error: too many resources requested for launch"), lambda: None, GenerationFailed),
        (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), dead_probe, DeviceError),
        (RuntimeError("CUDA error: out of memory"), dead_probe, OutOfMemory),  # survivable: no probe needed
        (GenerationFailed(), dead_probe, GenerationFailed),  # ours, as raised
    ],
)
def test_a_probe_of_the_device_not_the_message_decides_fatal(error: BaseException, probe, expected: type) -> None:
    assert type(classify(error, probe=probe)) is expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (BackPressureError(num_queued_requests=8, max_queued_requests=8), Overloaded),
        (RayActorError(), ReplicaFailed),
        (KeyError("seed"), InternalError),
    ],
)
def test_handle_callers_classify_ray_failures(error: BaseException, expected: type) -> None:
    assert type(from_ray(error)) is expected


def test_only_a_dead_device_is_fatal() -> None:
    assert [error_type for error_type, cls in CATALOG.items() if cls.fatal] == ["device_error"]


@pytest.mark.parametrize("convert", [as_service_error, classify, from_ray])
def test_exception_text_never_reaches_the_client(convert) -> None:
    """The text of an unknown exception can name hosts, paths or internals: the client reads the
    catalog's message, and the caller logs the exception."""
    failure = convert(ConnectionError("Error connecting to redis-internal.example:6379"))
    assert "redis" not in str(failure.detail) and failure.detail == type(failure).default_detail


def test_an_error_body_from_another_process_maps_back_to_its_class() -> None:
    assert from_body(ErrorBody(detail="x", error_type="deadline_exceeded")).status_code == 504
    assert isinstance(from_body(ErrorBody(detail="x", error_type="no_such_type")), InternalError)


def test_errors_survive_pickling_with_their_state() -> None:
    """Ray pickles an error raised in one replica to re-raise it in the caller."""
    error = pickle.loads(pickle.dumps(Overloaded("the job queue is full", retry_after_s=7)))
    assert (error.detail, error.retry_after_s, error.headers()["Retry-After"]) == ("the job queue is full", 7, "7")


def test_an_error_raised_in_another_replica_is_classified_as_raised() -> None:
    wrapped = RayTaskError("submit", "traceback", Overloaded(retry_after_s=2)).as_instanceof_cause()
    failure = from_ray(wrapped)
    assert type(failure) is Overloaded and failure.retry_after_s == 2
