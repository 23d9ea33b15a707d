"""Catalog errors as HTTP: one JSON body shape, the error's status and headers; FastAPI's own
rejections rendered the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from serve_app.contract.errors import (
    HttpError,
    MethodNotAllowed,
    NotFound,
    RequestTimeout,
    RequestTooLarge,
    ServiceError,
    ValidationFailed,
)

MAX_VALIDATION_ERRORS = 20  # a body of unknown fields must not become megabytes of errors
MAX_ERROR_TEXT = 200  # characters of any one string in an error item (a field name can be the whole body)


def error_response(error: ServiceError) -> JSONResponse:
    """The error as JSON with its status and headers, and `X-Fal-Error-Type` (what `fal_client` reads
    when a body has no `error_type`)."""
    headers = {**error.headers(), "X-Fal-Error-Type": error.error_type}
    return JSONResponse(error.body().model_dump(), status_code=error.status_code, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Catalog errors raised by a route, and FastAPI's own rejections, in the catalog's shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(ValidationFailed(bounded_errors(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400 and isinstance(error.__cause__, ValueError | RecursionError):
            # FastAPI's "error parsing the body": not UTF-8 (or UTF-16/32), or nested past the parser's
            # depth. Malformed JSON all the same, as `json.JSONDecodeError` is (FastAPI's 422).
            item = {"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error"}
            return error_response(ValidationFailed(bounded_errors([{**item, "ctx": {"error": str(error.__cause__)}}])))
        known: dict[int, type[ServiceError]] = {
            404: NotFound,
            405: MethodNotAllowed,
            408: RequestTimeout,
            413: RequestTooLarge,
        }
        if error.status_code in known:
            failure = known[error.status_code](str(error.detail))
        else:
            failure = HttpError(str(error.detail), error.status_code)
        response = error_response(failure)
        response.headers.update(error.headers or {})  # e.g. 405's `Allow`
        return response


def bounded_errors(errors: Sequence[dict]) -> list[dict]:
    """Validation errors as the client reads them: without the echoed input (it can be the whole body),
    at most `MAX_VALIDATION_ERRORS` items and `MAX_ERROR_TEXT` characters per string, then a count."""
    shown = [
        _truncated(jsonable_encoder({key: value for key, value in item.items() if key != "input"}))
        for item in errors[:MAX_VALIDATION_ERRORS]
    ]
    if len(errors) > MAX_VALIDATION_ERRORS:
        more = len(errors) - MAX_VALIDATION_ERRORS
        shown.append({"type": "too_many_errors", "loc": ["body"], "msg": f"{more} more errors not shown"})
    return shown


def _truncated(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_ERROR_TEXT else value[:MAX_ERROR_TEXT] + "..."
    if isinstance(value, list):
        return [_truncated(item) for item in value]
    if isinstance(value, dict):
        return {key: _truncated(item) for key, item in value.items()}
    return value
