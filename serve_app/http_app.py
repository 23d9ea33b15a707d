"""The FastAPI app, built from the config in one place: every route and every layer a request passes.

The ingress deployment calls `build_http_app` once per replica, after its constructor (Serve's
late-bound ingress, `__serve_build_asgi_app__`), so the middlewares get their settings directly.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the routes.
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from serve_app.config import AppConfig
from serve_app.edge import BODY_TIMEOUT_S, MAX_BODY_BYTES, MAX_HEAD_BYTES, BodyGuard, HeadSizeLimit, HostAllowList
from serve_app.errors import (
    HttpError,
    MethodNotAllowed,
    NotFound,
    RequestTimeout,
    RequestTooLarge,
    ServiceError,
    ValidationFailed,
)
from serve_app.jobs.gateway import JobGateway
from serve_app.middleware import ApiKeys, ClientConcurrencyLimit, FalRequestId, RequireApiKey, SecurityHeaders
from serve_app.schemas import ErrorBody, FinalEvent, GenerationRequest, GenerationResult, PreviewEvent

PLAYGROUND_HTML = (Path(__file__).parent / "static" / "playground.html").read_text(encoding="utf-8")
# Sent by @fal-ai/client (x-fal-queue-priority on every submit): a browser preflight must allow them.
FAL_CLIENT_HEADERS = (
    "x-fal-queue-priority",
    "x-fal-runner-hint",
    "x-fal-request-timeout",
    "x-fal-object-lifecycle-preference",
)
MAX_VALIDATION_ERRORS = 20  # a body of unknown fields must not become megabytes of errors
MAX_ERROR_TEXT = 200  # characters of any one string in an error item (a field name can be the whole body)

ERROR_RESPONSES = {
    401: {"model": ErrorBody, "description": "API keys are configured and the request has none or a wrong one."},
    413: {"model": ErrorBody, "description": "The body is over 1 MiB."},
    429: {"model": ErrorBody, "description": "`max_generations_per_client` reached: retry after `Retry-After`."},
    503: {"model": ErrorBody, "description": "Overloaded: retry after `Retry-After` seconds."},
}
STREAM_RESPONSES = {
    **ERROR_RESPONSES,
    200: {
        "description": "Server-Sent Events: `data:` events that are `PreviewEvent`s, then one `FinalEvent`; "
        "or an `event: error` event whose data is an `ErrorBody`. `: keepalive` comments may come between.",
        "content": {
            "text/event-stream": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/PreviewEvent"},
                        {"$ref": "#/components/schemas/FinalEvent"},
                        {"$ref": "#/components/schemas/ErrorBody"},
                    ]
                }
            }
        },
    },
}


class GenerationService(Protocol):
    """What the generation routes call: the ingress deployment."""

    async def stream(self, body: GenerationRequest) -> Response: ...

    async def run(self, body: GenerationRequest) -> Response | GenerationResult: ...

    async def health(self) -> Response: ...


def build_http_app(config: AppConfig, service: GenerationService, jobs: JobGateway) -> FastAPI:
    app = FastAPIOffline(  # FastAPI with /docs and /redoc served from the package, not a CDN
        title="Streaming SDXL",
        description="fal-compatible SDXL: `POST /stream` streams TAESD previews then the final image as SSE; "
        f"`POST /` returns the final result as JSON; both also at `/{config.app_id}`, and fal's queue API "
        f"under `/queue/{config.app_id}`.",
    )
    _add_error_handlers(app)

    for prefix in ("", f"/{config.app_id}"):  # fal clients call https://<host>/<app id>[/stream]

        @app.post(f"{prefix}/stream", response_class=EventSourceResponse, responses=STREAM_RESPONSES)
        async def stream(body: GenerationRequest):
            """Stream previews every few steps, then the final image as the last event."""
            return await service.stream(body)

        @app.post(prefix or "/", response_model=GenerationResult, responses=ERROR_RESPONSES)
        async def run(body: GenerationRequest):
            """Generate and return the finished image as JSON (no stream)."""
            return await service.run(body)

    _add_queue_routes(app, config, jobs)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        """A page to try the service: live previews, progress, the final image, cancel."""
        return HTMLResponse(PLAYGROUND_HTML)

    @app.get("/health")
    async def health() -> Response:
        """200 once at least one SDXL replica has loaded its model, 503 before."""
        return await service.health()

    app.openapi = lambda: _openapi_with_events(app)

    # Added last runs first: the request id and security headers are on every response; a huge head
    # or a foreign Host is refused before anything else; CORS answers preflights before auth; auth
    # rejects before the body is read; the per-client limit counts only authenticated requests; the
    # body is read (bounded in size and time) last, just before the routes.
    keys = ApiKeys.from_env(config.api_keys_env)
    app.add_middleware(BodyGuard, max_bytes=MAX_BODY_BYTES, timeout_s=BODY_TIMEOUT_S, stop_on_disconnect=True)
    if config.max_generations_per_client is not None:
        app.add_middleware(
            ClientConcurrencyLimit,
            limit=config.max_generations_per_client,
            generation_paths=["/", "/stream", f"/{config.app_id}", f"/{config.app_id}/stream"],
            queue_path=f"/queue/{config.app_id}",
            keys=keys,
            job_in_flight=jobs.in_flight,
            address_header=config.client_address_header,
        )
    app.add_middleware(RequireApiKey, keys=keys)
    if config.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_allow_origins,
            allow_methods=["GET", "POST", "PUT", "OPTIONS"],
            allow_headers=[
                "authorization",
                "content-type",
                "accept",
                "x-request-id",
                *FAL_CLIENT_HEADERS,
            ],
            expose_headers=["x-request-id", "x-fal-request-id", "x-fal-request-timeout-type", "retry-after"],
            max_age=600,
        )
    app.add_middleware(HostAllowList, allowed=config.allowed_hosts)
    app.add_middleware(HeadSizeLimit, max_bytes=MAX_HEAD_BYTES)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(FalRequestId)
    return app


def _add_queue_routes(app: FastAPI, config: AppConfig, jobs: JobGateway) -> None:
    """fal's queue API (what `subscribe`, `submit`, `status`, `result` and `cancel` call)."""
    queue = f"/queue/{config.app_id}"
    job = f"{queue}/requests/{{request_id}}"

    @app.post(queue, responses=ERROR_RESPONSES)
    async def submit(body: GenerationRequest, request: Request, fal_webhook: str | None = None) -> Response:
        """Queue a generation; poll `status_url`, then fetch `response_url`."""
        return await jobs.submit(body, request, fal_webhook)

    @app.get(f"{job}/status")
    async def status(request_id: str, request: Request, logs: str | None = None) -> Response:
        """IN_QUEUE (with `queue_position`), IN_PROGRESS or COMPLETED; `logs=1` adds the job's logs."""
        return await jobs.status(request_id, request, logs)

    @app.get(f"{job}/status/stream")
    async def status_stream(request_id: str, request: Request, logs: str | None = None) -> Response:
        """The same status objects as Server-Sent Events, ending after COMPLETED."""
        return await jobs.status_stream(request_id, request, logs)

    @app.get(job)
    async def result(request_id: str, request: Request) -> Response:
        """The result, as `POST /` returns it; a failed or cancelled job's error with its status."""
        return await jobs.result(request_id, request)

    @app.put(f"{job}/cancel", status_code=202)
    async def cancel(request_id: str) -> Response:
        """Remove a queued job, or stop a running one at its next denoising step."""
        return await jobs.cancel(request_id)

    @app.get("/files/{request_id}/{name}", include_in_schema=False)
    async def file(request_id: str, name: str) -> Response:
        """A queue result's image, while the job is kept."""
        return await jobs.file(f"{request_id}/{name}")


def _add_error_handlers(app: FastAPI) -> None:
    """Catalog errors raised by a route, and FastAPI's own rejections, in the catalog's shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return ValidationFailed(_bounded_errors(error.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400 and isinstance(error.__cause__, ValueError | RecursionError):
            # FastAPI's "error parsing the body": not UTF-8 (or UTF-16/32), or nested past the parser's
            # depth. Malformed JSON all the same, as `json.JSONDecodeError` is (FastAPI's 422).
            item = {"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error"}
            return ValidationFailed(_bounded_errors([{**item, "ctx": {"error": str(error.__cause__)}}])).response()
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
        response = failure.response()
        response.headers.update(error.headers or {})  # e.g. 405's `Allow`
        return response


def _bounded_errors(errors: Sequence[dict]) -> list[dict]:
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


def _openapi_with_events(app: FastAPI) -> dict:
    """FastAPI's schema plus the SSE event models, which no route returns as JSON."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (PreviewEvent, FinalEvent, ErrorBody):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema
