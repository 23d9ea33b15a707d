"""The FastAPI app, built from the config and the route table in one place: every route and every
layer a request passes.

The ingress deployment calls `build_http_app` once per replica, after its constructor (Serve's
late-bound ingress, `__serve_build_asgi_app__`), so the middlewares get their settings directly.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the routes.
import html
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from fastapi_offline import FastAPIOffline
from sse_starlette import EventSourceResponse
from starlette.middleware.cors import CORSMiddleware

from serve_app.config import AppConfig
from serve_app.contract.errors import ErrorBody
from serve_app.contract.events import FinalEvent, GenerationResult, PreviewEvent
from serve_app.contract.queue import CancelAccepted, QueueStatus, QueueSubmitted
from serve_app.contract.requests import GenerationRequest, ImageToImageRequest, InpaintingRequest, ResolvedRequest
from serve_app.http.edge import BODY_TIMEOUT_S, MAX_BODY_BYTES, MAX_HEAD_BYTES, BodyGuard, HeadSizeLimit, HostAllowList
from serve_app.http.errors import add_error_handlers
from serve_app.http.middleware import (
    ApiKeys,
    ClientConcurrencyLimit,
    ClientPollLimit,
    FalRequestId,
    RequireApiKey,
    SecurityHeaders,
    request_owner,
    route_path,
)
from serve_app.http.queue_api import QueueApi, start_timeout_s
from serve_app.http.relay import GenerationRelay
from serve_app.http.routes import IMAGE_TASKS, RouteTable
from serve_app.inputs.resolver import Caller, ImageInputs
from serve_app.inputs.uploads import UploadInitiate, Uploads, UploadTarget
from serve_app.queue.outputs import OutputStore

RUNNER_HINT_HEADER = "x-fal-runner-hint"  # fal's: requests with the same hint go to the same runner
PLAYGROUND_HTML = (Path(__file__).parent / "static" / "playground.html").read_text(encoding="utf-8")
# Sent by @fal-ai/client (x-fal-queue-priority on every submit): a browser preflight must allow them.
FAL_CLIENT_HEADERS = (
    "x-fal-queue-priority",
    "x-fal-runner-hint",
    "x-fal-request-timeout",
    "x-fal-object-lifecycle-preference",
)

ERROR_RESPONSES = {
    401: {"model": ErrorBody, "description": "API keys are configured and the request has none or a wrong one."},
    413: {"model": ErrorBody, "description": "The body is over 1 MiB (image routes: `inputs.max_body_bytes`)."},
    429: {"model": ErrorBody, "description": "`max_generations_per_client` reached: retry after `Retry-After`."},
    503: {"model": ErrorBody, "description": "Overloaded: retry after `Retry-After` seconds."},
}
JOB_RESPONSES = {
    400: {"model": ErrorBody, "description": "Not completed yet, already completed, or the job's own error."},
    401: ERROR_RESPONSES[401],
    404: {"model": ErrorBody, "description": "No such job (unknown id, or kept no longer)."},
}


def _sse_responses(*event_models: str, with_errors: bool = True) -> dict:
    events = {"oneOf": [{"$ref": f"#/components/schemas/{name}"} for name in event_models]}
    return {
        **(ERROR_RESPONSES if with_errors else JOB_RESPONSES),
        200: {
            "description": "Server-Sent Events (`: keepalive` comments may come between).",
            "content": {"text/event-stream": {"schema": events}},
        },
    }


Handler = Callable[..., Awaitable[Response]]


def build_http_app(
    config: AppConfig,
    routes: RouteTable,
    relay: GenerationRelay,
    queue_api: QueueApi,
    health: Callable[[], Awaitable[Response]],
    outputs: OutputStore | None = None,
) -> FastAPI:
    """`outputs`: the object store of result files and uploads (the queue's, `queue.outputs_url`); in memory
    when not given (tests of routes that store nothing)."""
    outputs = outputs or OutputStore.in_memory(config.queue)
    inputs = ImageInputs(config.inputs, outputs)
    uploads = Uploads(outputs, config.inputs)
    keys = ApiKeys.from_env(config.http.api_keys_env)
    app = FastAPIOffline(  # FastAPI with /docs and /redoc served from the package, not a CDN
        title="Streaming SDXL",
        description="fal-compatible SDXL: `POST /stream` streams TAESD previews then the final image as SSE; "
        f"`POST /` returns the final result as JSON; both also at `/{config.app_id}`, and fal's queue API "
        f"under `/queue/{config.app_id}`.",
    )
    add_error_handlers(app)
    policy = config.request_policy()  # every generation's defaults and limits, applied here and only here

    async def stream(body: GenerationRequest, request: Request):
        """Stream previews every few steps, then the final image as the last event."""
        return await relay.stream(resolved(body, request), start_timeout_s(request))

    async def run(body: GenerationRequest, request: Request):
        """Generate and return the finished image as JSON (no stream)."""
        return await relay.run(resolved(body, request), start_timeout_s(request))

    async def submit(body: GenerationRequest, request: Request, fal_webhook: str | None = None) -> Response:
        """Queue a generation; poll `status_url`, then fetch `response_url`."""
        return await queue_api.submit(resolved(body, request), request, fal_webhook)

    def resolved(body: GenerationRequest, request: Request) -> ResolvedRequest:
        return policy.resolve(body, runner_hint=request.headers.get(RUNNER_HINT_HEADER, ""))

    async def image_resolved(body: ImageToImageRequest, request: Request) -> ResolvedRequest:
        return await inputs.resolve(body, policy, caller(request), request.headers.get(RUNNER_HINT_HEADER, ""))

    def caller(request: Request) -> Caller:
        return Caller(
            owner=request_owner(keys, request.headers),
            host=request.headers.get("host", ""),
            root_path=request.scope.get("root_path", ""),
        )

    def image_task_handlers(model: type[ImageToImageRequest]) -> dict[str, Handler]:
        """Run, stream and submit for one image task: its images loaded and checked, then as text to image."""

        async def image_run(body: model, request: Request):  # type: ignore[valid-type]
            return await relay.run(await image_resolved(body, request), start_timeout_s(request))

        async def image_stream(body: model, request: Request):  # type: ignore[valid-type]
            return await relay.stream(await image_resolved(body, request), start_timeout_s(request))

        async def image_submit(body: model, request: Request, fal_webhook: str | None = None) -> Response:  # type: ignore[valid-type]
            return await queue_api.submit(await image_resolved(body, request), request, fal_webhook)

        image_run.__doc__ = f"{model.__doc__.splitlines()[0]} Returns the finished image as JSON."
        image_stream.__doc__ = f"{model.__doc__.splitlines()[0]} Streams previews, then the final image."
        image_submit.__doc__ = f"{model.__doc__.splitlines()[0]} Queued: poll its status, then fetch its result."
        return {"run": image_run, "stream": image_stream, "submit": image_submit}

    async def upload_initiate(body: UploadInitiate, request: Request) -> UploadTarget:
        """fal's upload protocol, step one (`fal.storage.upload`): where to PUT an image, and its URL."""
        return await uploads.initiate(body, caller(request).owner, str(request.base_url))

    async def upload_put(token: str, name: str, request: Request) -> Response:
        """fal's upload protocol, step two: the image's bytes, once, before the upload expires."""
        await uploads.receive(f"{token}/{name}", await request.body())
        return Response(status_code=200)

    async def status(request_id: str, request: Request, logs: str | None = None) -> Response:
        """IN_QUEUE (with `queue_position`), IN_PROGRESS or COMPLETED; `logs=1` adds the job's logs."""
        return await queue_api.status(request_id, request, logs)

    async def status_stream(
        request_id: str, request: Request, logs: str | None = None, previews: str | None = None
    ) -> Response:
        """The same status objects as Server-Sent Events, ending after COMPLETED. `previews=1` adds the
        running job's TAESD previews (`{"type": "preview", ...}`, as `POST /stream` sends them) and gives
        every event an SSE `id`: a viewer reconnecting with `Last-Event-ID` resumes where it was."""
        return await queue_api.status_stream(request_id, request, logs, previews)

    async def result(request_id: str, request: Request) -> Response:
        """The result, as `POST /` returns it; a failed or cancelled job's error with its status."""
        return await queue_api.result(request_id, request)

    async def cancel(request_id: str, request: Request) -> Response:
        """Remove a queued job, or stop a running one at its next denoising step."""
        return await queue_api.cancel(request_id, request)

    async def file(token: str, name: str) -> Response:
        """A queue result's image, while the job is kept: its URL carries a token of its own."""
        return await queue_api.file(f"{token}/{name}")

    async def jwks() -> Response:
        """The public key webhooks are signed with (ED25519, as a JWKS), as fal publishes its own."""
        return await queue_api.jwks()

    async def playground() -> HTMLResponse:
        """A page to try the service: live previews, progress, the final image, cancel."""
        return HTMLResponse(PLAYGROUND_HTML.replace("__APP_ID__", html.escape(config.app_id)))

    async def health_check() -> Response:
        """200 once at least one SDXL replica has loaded its model, 503 before."""
        return await health()

    handlers: dict[str, tuple[Handler, dict]] = {
        "stream": (
            stream,
            {
                "response_class": EventSourceResponse,
                "responses": _sse_responses("PreviewEvent", "FinalEvent", "ErrorBody"),
            },
        ),
        "run": (run, {"response_model": GenerationResult, "responses": ERROR_RESPONSES}),
        "submit": (submit, {"response_model": QueueSubmitted, "responses": ERROR_RESPONSES}),
        "status": (status, {"response_model": QueueStatus, "responses": JOB_RESPONSES}),
        "status_stream": (
            status_stream,
            {"response_class": EventSourceResponse, "responses": _sse_responses("QueueStatus", with_errors=False)},
        ),
        "result": (result, {"response_model": GenerationResult, "responses": JOB_RESPONSES}),
        "cancel": (cancel, {"response_model": CancelAccepted, "status_code": 202, "responses": JOB_RESPONSES}),
        "file": (file, {"include_in_schema": False}),
        "upload_initiate": (upload_initiate, {"response_model": UploadTarget}),
        "upload_put": (upload_put, {"include_in_schema": False}),
        "playground": (playground, {"response_class": HTMLResponse, "include_in_schema": False}),
        "jwks": (jwks, {}),
        "health": (health_check, {}),
    }
    for kind, model in zip(IMAGE_TASKS.values(), (ImageToImageRequest, InpaintingRequest), strict=True):
        task_handlers = image_task_handlers(model)
        handlers[f"{kind}_run"] = (task_handlers["run"], dict(handlers["run"][1]))
        handlers[f"{kind}_stream"] = (task_handlers["stream"], dict(handlers["stream"][1]))
        handlers[f"{kind}_submit"] = (task_handlers["submit"], dict(handlers["submit"][1]))
    for endpoint in routes.endpoints:
        handler, options = handlers[endpoint.name]
        app.add_api_route(endpoint.path, handler, methods=sorted(endpoint.methods), name=endpoint.name, **options)

    app.openapi = lambda: _openapi_with_events(app)

    # Added last runs first: the request id and security headers are on every response; a huge head
    # or a foreign Host is refused before anything else; CORS answers preflights before auth; auth
    # rejects before the body is read; the per-client limit counts only authenticated requests; the
    # body is read (bounded in size and time) last, just before the routes.

    def body_limits(scope: dict) -> tuple[int, float]:
        if scope["type"] == "http" and routes.takes_images(scope["method"], route_path(scope)):
            return config.inputs.max_body_bytes, config.inputs.body_timeout_s
        return MAX_BODY_BYTES, BODY_TIMEOUT_S

    app.add_middleware(BodyGuard, stop_on_disconnect=True, limits_for=body_limits)
    if config.http.max_generations_per_client is not None and queue_api.ledger is not None:
        app.add_middleware(
            ClientConcurrencyLimit,
            limit=config.http.max_generations_per_client,
            routes=routes,
            ledger=queue_api.ledger,
            keys=keys,
            address_header=config.http.client_address_header,
        )
    if config.http.max_polls_per_client_per_s is not None:
        app.add_middleware(
            ClientPollLimit,
            per_s=config.http.max_polls_per_client_per_s,
            routes=routes,
            keys=keys,
            address_header=config.http.client_address_header,
        )
    app.add_middleware(RequireApiKey, keys=keys, routes=routes)
    if config.http.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.http.cors_allow_origins,
            allow_methods=["GET", "POST", "PUT", "OPTIONS"],
            allow_headers=[
                "authorization",
                "content-type",
                "accept",
                "x-request-id",
                *FAL_CLIENT_HEADERS,
            ],
            expose_headers=[
                "x-request-id",
                "x-fal-request-id",
                "x-fal-request-timeout-type",
                "x-fal-error-type",
                "retry-after",
            ],
            max_age=600,
        )
    app.add_middleware(HostAllowList, allowed=config.http.allowed_hosts)
    app.add_middleware(HeadSizeLimit, max_bytes=MAX_HEAD_BYTES)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(FalRequestId)
    return app


def _openapi_with_events(app: FastAPI) -> dict:
    """FastAPI's schema plus the SSE event models, which no route returns as JSON."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (PreviewEvent, FinalEvent, ErrorBody, QueueStatus):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema
