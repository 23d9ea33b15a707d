"""The error catalog: every failure's type and status, how exceptions are classified, and the README's table."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from serve_app.errors import (
    CATALOG,
    DeviceError,
    GenerationFailed,
    InternalError,
    OutOfMemory,
    Overloaded,
    ReplicaFailed,
    Unauthorized,
    classify,
    from_body,
)
from serve_app.schemas import ErrorBody
from tests.integration.harness import REPO


def readme_failure_table() -> dict[str, int]:
    """`error_type` -> HTTP status, from the README's "When things go wrong" table."""
    section = REPO.joinpath("README.md").read_text().split("## When things go wrong", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\|.*\| (\d{3}) \| `([a-z_]+)` \|", line)
        if match:
            rows[match.group(2)] = int(match.group(1))
    return rows


def test_readme_table_is_the_catalog() -> None:
    table = readme_failure_table()
    assert table == {error_type: cls.status_code for error_type, cls in CATALOG.items() if error_type != "http_error"}


def test_every_error_renders_the_one_body_shape() -> None:
    for error_type, cls in CATALOG.items():
        response = cls().response()
        assert response.status_code == cls.status_code
        assert response.body.startswith(b'{"detail":')
        assert ErrorBody.model_validate_json(response.body).error_type == error_type


def test_headers_travel_with_their_error() -> None:
    assert Overloaded(retry_after_s=3.4).response().headers["retry-after"] == "3"
    assert Overloaded().response().headers["retry-after"] == "1"
    assert Unauthorized().response().headers["www-authenticate"] == "Key"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), OutOfMemory),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), OutOfMemory),
        (RuntimeError("CUDA error: out of memory"), OutOfMemory),  # not the allocator's, still recoverable
        (RuntimeError("CUDA error: an illegal memory access was encountered"), DeviceError),
        (RuntimeError("CUDA error: device-side assert triggered"), DeviceError),
        (ValueError("bad shapes"), GenerationFailed),
        (RuntimeError("expected scalar type Half but found Float"), GenerationFailed),
        (BackPressureError(num_queued_requests=8, max_queued_requests=8), Overloaded),
        (RayActorError(), ReplicaFailed),
    ],
)
def test_classify(error: BaseException, expected: type) -> None:
    assert type(classify(error, fallback=GenerationFailed)) is expected


def test_only_a_dead_device_is_fatal() -> None:
    assert [error_type for error_type, cls in CATALOG.items() if cls.fatal] == ["device_error"]


def test_unknown_exceptions_use_the_fallback_and_keep_their_message() -> None:
    failure = classify(KeyError("seed"))
    assert isinstance(failure, InternalError)
    assert failure.detail == "KeyError: 'seed'"


def test_an_error_body_from_another_process_maps_back_to_its_class() -> None:
    assert from_body(ErrorBody(detail="x", error_type="deadline_exceeded")).status_code == 504
    assert isinstance(from_body(ErrorBody(detail="x", error_type="no_such_type")), InternalError)


def test_errors_survive_pickling_with_their_state() -> None:
    """Ray pickles an error raised in one replica to re-raise it in the caller."""
    error = pickle.loads(pickle.dumps(Overloaded("the job queue is full", retry_after_s=7)))
    assert (error.detail, error.retry_after_s, error.response().headers["retry-after"]) == (
        "the job queue is full",
        7,
        "7",
    )


def test_an_error_raised_in_another_replica_is_classified_as_raised() -> None:
    wrapped = RayTaskError("submit", "traceback", Overloaded(retry_after_s=2)).as_instanceof_cause()
    failure = classify(wrapped)
    assert type(failure) is Overloaded and failure.retry_after_s == 2
