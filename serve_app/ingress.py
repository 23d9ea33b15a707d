"""The HTTP edge: forwards validated requests to the SDXL deployment and relays its events.

No torch here: this replica only speaks HTTP. Its FastAPI app is built from the config by
`serve_app.http_app.build_http_app` when the replica starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from serve_app.config import AppConfig
from serve_app.errors import InternalError, NotReady, Overloaded, QueueTimeout, ServiceError, classify, from_body
from serve_app.http_app import build_http_app
from serve_app.jobs.gateway import JobGateway
from serve_app.metrics import IngressMetrics
from serve_app.schemas import ErrorBody, FinalEvent, GenerationRequest, GenerationResult
from serve_app.sse import SEPARATOR, encode_event, error_event, is_terminal, keepalive_comment
from serve_app.status_server import StatusServer

logger = logging.getLogger("ray.serve")

HEALTH_CACHE_S = 2.0
FINISH_WAIT_S = 2.0  # from a call's terminal event to its end: the replica's cleanup, milliseconds
COUNTED_REJECTIONS = ("overloaded", "queue_timeout")


@serve.deployment
@serve.ingress()
class SDXLIngress:
    async def __init__(self, sdxl: DeploymentHandle, job_queue: DeploymentHandle, config: AppConfig) -> None:
        self._sdxl = sdxl
        self.config = config
        self._jobs = JobGateway(job_queue, config)
        self._metrics = IngressMetrics()
        self._health: tuple[float, bool] = (0.0, False)  # (checked at, an SDXL replica is running)
        self._health_refresh: asyncio.Task | None = None
        self._app = build_http_app(config, self, self._jobs)
        self._status_server: StatusServer | None = None
        if config.status_port is not None:
            self._status_server = StatusServer(self._app, config.status_host, config.status_port)
            self._status_server.start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    def __del__(self) -> None:
        status_server = getattr(self, "_status_server", None)  # None if __init__ failed before it
        if status_server is not None:
            status_server.stop()

    async def stream(self, body: GenerationRequest) -> Response:
        body = self.config.apply_request_defaults(body)
        events = self._sdxl.options(stream=True).generate.remote(body.model_dump())
        first = asyncio.ensure_future(asyncio.wait_for(_next_event(events), self.config.queue_timeout_s))
        try:
            # Wait briefly for the first event so that overload is still a 503, not a 200 stream.
            await asyncio.wait({first}, timeout=self.config.first_event_wait_s)
            if first.done() and isinstance(first.exception(), Overloaded):
                return self._failure(first.exception()).response()
        except BaseException:
            first.cancel()
            _stop(events)
            raise
        return RelayResponse(
            self._relay(first, events),
            on_end=lambda: (first.cancel(), _stop(events)),
            ping=self.config.keepalive_s,
            ping_message_factory=keepalive_comment,
            sep=SEPARATOR,
        )

    async def run(self, body: GenerationRequest) -> Response | GenerationResult:
        body = self.config.apply_request_defaults(body)
        events = self._sdxl.options(stream=True).generate.remote(body.model_dump(), previews=False)
        # Without previews the only event is the result: bound the wait for a replica plus the run.
        timeout_s = self.config.queue_timeout_s + self.config.request_timeout_s
        try:
            event = await asyncio.wait_for(_next_event(events), timeout_s)
        except Exception as error:  # noqa: BLE001 - every failure is a JSON error, never a bare 500
            _stop(events)
            return self._failure(error, timeout_s).response()
        except BaseException:
            _stop(events)
            raise
        await _finish(events)
        if event is None:
            return InternalError("the generation ended without a result").response()
        if event["type"] == "error":
            return from_body(ErrorBody.model_validate(event)).response()
        return FinalEvent.model_validate(event).result()

    async def health(self) -> Response:
        """From a cached answer, refreshed in the background: asking the controller costs ~30 ms of
        CPU, which a load balancer's polls must not pay each time."""
        checked_at, ready = self._health
        if checked_at == 0.0:
            await self._refresh_health()
            ready = self._health[1]
        elif time.monotonic() - checked_at > HEALTH_CACHE_S and not self._refreshing_health():
            self._health_refresh = asyncio.get_running_loop().create_task(self._refresh_health())
        return JSONResponse({"status": "ok"}) if ready else NotReady().response()

    def _refreshing_health(self) -> bool:
        return self._health_refresh is not None and not self._health_refresh.done()

    async def _refresh_health(self) -> None:
        self._health = (time.monotonic(), await asyncio.to_thread(self._sdxl_ready))

    def _sdxl_ready(self) -> bool:
        deployment = self._sdxl.deployment_id
        application = serve.status().applications.get(deployment.app_name)
        status = application.deployments.get(deployment.name) if application else None
        return bool(status and status.replica_states.get("RUNNING", 0) > 0)

    def _failure(self, error: BaseException, waited_s: float | None = None) -> ServiceError:
        """What the client is told about an exception met while waiting for or relaying events."""
        if isinstance(error, TimeoutError):
            waited_s = waited_s or self.config.queue_timeout_s
            failure: ServiceError = QueueTimeout(f"no model replica took the request within {waited_s:g} s")
        else:
            failure = classify(error)
        if failure.error_type in COUNTED_REJECTIONS:
            self._metrics.rejections.inc(tags={"reason": failure.error_type})
        if isinstance(error, RayActorError):
            logger.warning("SDXL replica failed: %s", error)
        elif not isinstance(error, ServiceError | TimeoutError):
            logger.exception("Relaying the generation failed", exc_info=error)
        return failure

    async def _relay(self, first: asyncio.Future, events: DeploymentResponseGenerator) -> AsyncIterator:
        """SSE events until the final or error event; a failure of any kind becomes an error event,
        after which the response is cut off (`StreamFailed`) so that fal clients raise too."""
        failed = True
        try:
            event = await first
            while event is not None:
                yield encode_event(event)
                if is_terminal(event):
                    failed = event["type"] == "error"
                    await _finish(events)
                    break
                event = await _next_event(events)
            else:
                yield error_event(InternalError("the stream ended without a result"))
        except Exception as error:  # noqa: BLE001 - the client must see an error event, never a silent end
            yield error_event(self._failure(error))
        finally:
            _stop(events)  # stops the replica's work if the client went away
        if failed:
            raise StreamFailed("the stream ended with an error event; its response is cut off on purpose")


class RelayResponse(EventSourceResponse):
    """An SSE response that stops the replica's work however it ends, even if it fails before its body
    iterator ever started (whose own `finally` then never runs): `on_end` must be idempotent."""

    def __init__(self, content: AsyncIterator, on_end: Callable[[], object], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()


class StreamFailed(Exception):
    """Raised after a stream's error event: the server then ends the response without HTTP/1.1's last
    chunk. curl, browsers and the playground have read the error event; `fal_client.stream` (which
    reads every event as data) raises on the broken body, and `@fal-ai/client`'s `done()` rejects
    instead of resolving to the error as if it were the result."""


def _stop(events: DeploymentResponseGenerator) -> None:
    """Cancel a handle call, stopping the replica's work if it still runs.

    `cancel()` re-raises the call's own failure (e.g. `BackPressureError`) when it already failed;
    that outcome was handled where it was read, so it is ignored here.
    """
    with contextlib.suppress(Exception):
        events.cancel()


async def _finish(events: DeploymentResponseGenerator) -> None:
    """After the terminal event: let the call end by itself (briefly), so that the replica logs and
    counts it as finished rather than cancelled; then make sure it has stopped."""
    try:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_next_event(events), FINISH_WAIT_S)
    finally:
        _stop(events)


async def _next_event(events: DeploymentResponseGenerator) -> dict | None:
    """The next event from the SDXL deployment, `None` at the end; overload as `Overloaded`."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
    except Exception as error:
        failure = classify(error)
        if isinstance(failure, Overloaded):
            raise failure from error
        raise
