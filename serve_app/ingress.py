"""The HTTP edge: validates requests, forwards them to the SDXL deployment, streams SSE back.

No torch here: this replica only speaks HTTP and relays events.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the routes.
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.auth import ApiKeys, RequireApiKey
from serve_app.body_limit import BodySizeLimit
from serve_app.config import AppConfig
from serve_app.http_middleware import FalRequestId, ReplicaCORS
from serve_app.metrics import IngressMetrics
from serve_app.schemas import ErrorBody, FinalEvent, GenerationRequest, GenerationResult, PreviewEvent
from serve_app.sse import SEPARATOR, encode_event, error_event, is_terminal, keepalive_comment

logger = logging.getLogger("ray.serve")

# Status codes for `POST /` when the generation fails; /stream sends these as error events.
ERROR_STATUS = {"deadline_exceeded": 504, "out_of_memory": 503, "replica_failed": 502}
HEALTH_CACHE_S = 1.0
PLAYGROUND_HTML = (Path(__file__).parent / "static" / "playground.html").read_text(encoding="utf-8")
OVERLOADED = "all replicas are busy and the queue is full; retry later"
MAX_BODY_BYTES = 1024 * 1024  # a request is a few KiB of JSON; anything near this is a mistake or abuse

app = FastAPI(
    title="Streaming SDXL",
    description="fal-compatible SDXL: `POST /stream` streams TAESD previews then the final image as SSE; "
    "`POST /` returns the final result as JSON.",
)
app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)


def _replica_api_keys() -> ApiKeys:
    return serve.get_replica_context().servable_object.api_keys


def _replica_config() -> AppConfig:
    return serve.get_replica_context().servable_object.config


# Added last runs first: CORS answers preflights before auth; every response carries the request id.
app.add_middleware(RequireApiKey, keys=_replica_api_keys)
app.add_middleware(ReplicaCORS, settings=_replica_config)
app.add_middleware(FalRequestId)


def _openapi() -> dict:
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


app.openapi = _openapi
ERROR_RESPONSES = {
    401: {"model": ErrorBody, "description": "API keys are configured and the request has none or a wrong one."},
    413: {"model": ErrorBody, "description": "The body is over 1 MiB."},
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


def error_response(status_code: int, detail: str | list, error_type: str, headers: dict | None = None) -> JSONResponse:
    body = ErrorBody(detail=detail, error_type=error_type).model_dump()
    return JSONResponse(status_code=status_code, content=body, headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    # The echoed input is dropped: it can be the whole (large) body.
    details = [{key: value for key, value in item.items() if key != "input"} for item in error.errors()]
    return error_response(422, jsonable_encoder(details), "validation_error")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    error_type = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return error_response(error.status_code, str(error.detail), error_type, headers=error.headers)


class Overloaded(Exception):
    def __init__(self, retry_after_s: float | None) -> None:
        self.retry_after_s = retry_after_s


def _stop(events: DeploymentResponseGenerator) -> None:
    """Cancel a handle call, stopping the replica's work if it still runs.

    `cancel()` re-raises the call's own failure (e.g. `BackPressureError`) when it already failed;
    that outcome was handled where it was read, so it is ignored here.
    """
    with contextlib.suppress(Exception):
        events.cancel()


async def _next_event(events: DeploymentResponseGenerator) -> dict | None:
    """The next event from the SDXL deployment, `None` at the end; overload as `Overloaded`."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
    except BackPressureError as error:
        raise Overloaded(error.retry_after_s) from error


# Everything the class uses must be defined above it: `serve.ingress` serializes the app here.
@serve.deployment
@serve.ingress(app)
class SDXLIngress:
    def __init__(self, sdxl: DeploymentHandle, config: AppConfig) -> None:
        self._sdxl = sdxl
        self.config = config  # read by the middlewares too
        self._metrics = IngressMetrics()
        self._health: tuple[float, bool] = (0.0, False)
        self.api_keys = ApiKeys.from_config(config)

    @app.post(
        "/stream",
        response_class=EventSourceResponse,
        responses=STREAM_RESPONSES,
    )
    async def stream(self, body: GenerationRequest):
        """Stream previews every few steps, then the final image as the last event."""
        body = self.config.apply_request_defaults(body)
        events = self._sdxl.options(stream=True).generate.remote(body.model_dump())
        first = asyncio.ensure_future(asyncio.wait_for(_next_event(events), self.config.queue_timeout_s))
        try:
            # Wait briefly for the first event so that overload is still a 503, not a 200 stream.
            await asyncio.wait({first}, timeout=self.config.first_event_wait_s)
            if first.done() and isinstance(first.exception(), Overloaded):
                return self._reject_overloaded(first.exception())
        except BaseException:
            first.cancel()
            _stop(events)
            raise
        return EventSourceResponse(
            self._relay(first, events),
            ping=self.config.keepalive_s,
            ping_message_factory=keepalive_comment,
            sep=SEPARATOR,
        )

    @app.post("/", response_model=GenerationResult, responses=ERROR_RESPONSES)
    async def run(self, body: GenerationRequest):
        """Generate and return the finished image as JSON (no stream)."""
        body = self.config.apply_request_defaults(body)
        events = self._sdxl.options(stream=True).generate.remote(body.model_dump(), previews=False)
        try:
            # Without previews the only event is the result: bound the wait for a replica plus the run.
            timeout_s = self.config.queue_timeout_s + self.config.request_timeout_s
            event = await asyncio.wait_for(_next_event(events), timeout_s)
        except Overloaded as error:
            return self._reject_overloaded(error)
        except TimeoutError:
            self.count_rejection("queue_timeout")
            return error_response(503, f"no result within {timeout_s:g} s", "queue_timeout")
        except RayActorError:
            return error_response(502, "the model replica serving this request failed", "replica_failed")
        finally:
            _stop(events)
        if event is None:
            return error_response(500, "the generation ended without a result", "internal_error")
        if event["type"] == "error":
            return error_response(ERROR_STATUS.get(event["error_type"], 500), event["detail"], event["error_type"])
        return GenerationResult.model_validate(FinalEvent.model_validate(event).model_dump())

    def count_rejection(self, reason: str) -> None:
        self._metrics.rejections.inc(tags={"reason": reason})

    def _reject_overloaded(self, error: Overloaded) -> JSONResponse:
        self.count_rejection("overloaded")
        retry_after = str(max(1, round(error.retry_after_s or 1)))
        return error_response(503, OVERLOADED, "overloaded", {"Retry-After": retry_after})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """A page to try the service: live previews, progress, the final image, cancel."""
        return HTMLResponse(PLAYGROUND_HTML)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 once at least one SDXL replica has loaded its model, 503 before."""
        checked_at, ready = self._health
        if time.monotonic() - checked_at > HEALTH_CACHE_S:
            ready = await asyncio.to_thread(self._sdxl_ready)
            self._health = (time.monotonic(), ready)
        if ready:
            return JSONResponse({"status": "ok"})
        return error_response(503, "the model is not loaded yet", "not_ready")

    def _sdxl_ready(self) -> bool:
        deployment = self._sdxl.deployment_id
        application = serve.status().applications.get(deployment.app_name)
        status = application.deployments.get(deployment.name) if application else None
        return bool(status and status.replica_states.get("RUNNING", 0) > 0)

    async def _relay(self, first: asyncio.Future, events: DeploymentResponseGenerator) -> AsyncIterator:
        """SSE events until the final or error event; a failure of any kind becomes an error event."""
        try:
            event = await first
            while event is not None:
                yield encode_event(event)
                if is_terminal(event):
                    return
                event = await _next_event(events)
            yield error_event("the stream ended without a result", "internal_error")
        except Overloaded:
            self.count_rejection("overloaded")
            yield error_event(OVERLOADED, "overloaded")
        except TimeoutError:
            self.count_rejection("queue_timeout")
            detail = f"no model replica took the request within {self.config.queue_timeout_s:g} s"
            yield error_event(detail, "queue_timeout")
        except RayActorError as error:
            logger.warning("SDXL replica failed mid-stream: %s", error)
            yield error_event("the model replica serving this request failed", "replica_failed")
        except Exception as error:  # noqa: BLE001 - the client must see an error event, never a silent end
            logger.exception("Stream failed")
            yield error_event(f"{type(error).__name__}: {error}", "internal_error")
        finally:
            _stop(events)  # stops the replica's work if the client went away
