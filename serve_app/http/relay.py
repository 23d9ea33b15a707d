"""`POST /stream` and `POST /`: a generation's events relayed as Server-Sent Events, or its result as JSON.

Everything goes through a `GenerationClient`, so this runs the same over Serve's handle and in-process
(the tests). Failures are catalog errors: before the stream starts, a JSON error with its status; after,
an SSE `error` event, then the response is cut off so that fal's clients raise too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.responses import Response
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from serve_app.config import HttpConfig, RequestConfig
from serve_app.contract.errors import (
    Overloaded,
    QueueTimeout,
    ServiceError,
    StartTimeout,
    ValidationFailed,
    as_service_error,
)
from serve_app.contract.events import (
    QUEUE_JOB,
    RESULT_ONLY,
    STREAM,
    FinalEvent,
    GenerationResult,
    ProgressEvent,
    RunMode,
)
from serve_app.contract.requests import ResolvedRequest
from serve_app.generation.client import GenerationCall, GenerationClient
from serve_app.http.errors import error_response
from serve_app.http.sse import SEPARATOR, encode_event, error_event, keepalive_comment

logger = logging.getLogger("ray.serve")

COUNTED_REJECTIONS = ("overloaded", "queue_timeout")
RETRIES = 2  # tries on other replicas after one refused the request (it left service) or died under it


class GenerationRelay:
    def __init__(
        self,
        generation: GenerationClient,
        requests: RequestConfig,
        http: HttpConfig,
        on_rejection: Callable[[str], None] | None = None,
    ) -> None:
        """`on_rejection` gets the `error_type` of each request turned away before it generated (metrics)."""
        self._generation = generation
        self._queue_timeout_s = requests.queue_timeout_s
        self._run_timeout_s = requests.queue_timeout_s + requests.timeout_s
        self._first_event_wait_s = http.first_event_wait_s
        self._keepalive_s = http.keepalive_s
        self._on_rejection = on_rejection

    async def stream(self, request: ResolvedRequest, start_timeout_s: float | None = None) -> Response:
        """`start_timeout_s` (fal's `X-Fal-Request-Timeout`) bounds the wait for a replica, like
        `requests.queue_timeout_s` but answered as fal answers it (504, never retried)."""
        call = RetriedCall(self._generation, request, STREAM)
        wait_s = min(self._queue_timeout_s, start_timeout_s or float("inf"))
        first = asyncio.ensure_future(call.first_event(wait_s, user_timeout=wait_s == start_timeout_s))
        try:
            # Wait briefly for the first event so that overload is still a 503, not a 200 stream, and a request the
            # replica refused (an adapter that does not load) a 422.
            await asyncio.wait({first}, timeout=self._first_event_wait_s)
            if first.done() and not first.cancelled() and isinstance(first.exception(), (Overloaded, ValidationFailed)):
                return error_response(self._failure(first.exception()))
        except BaseException:
            first.cancel()
            call.cancel()
            raise
        return RelayResponse(
            self._relay(first, call),
            on_end=lambda: (first.cancel(), call.cancel()),
            ping=self._keepalive_s,
            ping_message_factory=keepalive_comment,
            sep=SEPARATOR,
        )

    async def run(self, request: ResolvedRequest, start_timeout_s: float | None = None) -> Response | GenerationResult:
        """The result as JSON. With `start_timeout_s` the replica reports each step, so that the wait for
        one to start is bounded apart from the run."""
        call = RetriedCall(self._generation, request, RESULT_ONLY if start_timeout_s is None else QUEUE_JOB)
        if start_timeout_s is None:
            outcome = call.result()  # the only event: bound the wait for a replica plus the run
        else:
            outcome = call.result(lambda current: _started_within(current, start_timeout_s))
        try:
            final = await asyncio.wait_for(outcome, self._run_timeout_s)
        except Exception as error:  # noqa: BLE001 - every failure is a JSON error, never a bare 500
            return error_response(self._failure(error, self._run_timeout_s))
        finally:
            call.cancel()  # a no-op once the call ended by itself
        return final.result()

    def _failure(self, error: BaseException, waited_s: float | None = None) -> ServiceError:
        """What the client is told about an exception met while waiting for or relaying events."""
        if isinstance(error, TimeoutError):
            failure: ServiceError = QueueTimeout(
                f"no model replica took the request within {waited_s or self._queue_timeout_s:g} s"
            )
        else:
            if not isinstance(error, ServiceError):
                logger.error("Relaying the generation failed", exc_info=error)
            failure = as_service_error(error)
        if failure.error_type in COUNTED_REJECTIONS and self._on_rejection is not None:
            self._on_rejection(failure.error_type)
        return failure

    async def _relay(self, first: asyncio.Future, call: RetriedCall) -> AsyncIterator:
        """SSE events until the final event; a failure of any kind becomes an error event, after which
        the response is cut off (`StreamFailed`) so that fal clients raise too."""
        failed = True
        try:
            event = await first
            while True:
                yield encode_event(event)
                event = await anext(call.current)
        except StopAsyncIteration:  # after the final event: the call ended as it should
            failed = False
        except Exception as error:  # noqa: BLE001 - the client must see an error event, never a silent end
            yield error_event(self._failure(error))
        finally:
            call.cancel()  # stops the replica's work if the client went away
        if failed:
            raise StreamFailed("the stream ended with an error event; its response is cut off on purpose")


class RetriedCall:
    """A generation that a replica which left service refuses (a retryable error, such as a dead device
    or a replica killed before it sent anything) is tried again on another one, up to `RETRIES` times,
    as long as the client has seen nothing of it."""

    def __init__(self, generation: GenerationClient, request: ResolvedRequest, mode: RunMode) -> None:
        self._generation, self._request, self._mode = generation, request, mode
        self.current: GenerationCall = generation.events(request, mode)
        self._calls = [self.current]

    def _again(self, error: ServiceError, attempt: int) -> bool:
        if not error.retryable or attempt >= RETRIES:
            return False
        logger.warning("A model replica failed the request before it started (%s); trying another", error.error_type)
        self.current = self._generation.events(self._request, self._mode)
        self._calls.append(self.current)
        return True

    async def first_event(self, wait_s: float, user_timeout: bool):
        """The first event within `wait_s` in all (see `_first_event`), from whichever replica gives one."""
        deadline = time.monotonic() + wait_s
        for attempt in range(RETRIES + 1):
            try:
                return await _first_event(self.current, max(0.0, deadline - time.monotonic()), user_timeout)
            except ServiceError as error:
                if not self._again(error, attempt):
                    raise
        raise AssertionError("unreachable")

    async def result(self, read: Callable[[GenerationCall], Awaitable[FinalEvent]] | None = None) -> FinalEvent:
        """The final event (read by `read`, by default the call's `result`), retried as above: `POST /`
        has sent nothing until it answers."""
        for attempt in range(RETRIES + 1):
            try:
                return await (read(self.current) if read is not None else self.current.result())
            except ServiceError as error:
                if not self._again(error, attempt):
                    raise
        raise AssertionError("unreachable")

    def cancel(self) -> None:
        for call in self._calls:
            call.cancel()


async def _started_within(call: GenerationCall, start_timeout_s: float) -> FinalEvent:
    """The call's final event; a `StartTimeout` if no step was done within `start_timeout_s`."""
    started = asyncio.Event()

    async def on_progress(event: ProgressEvent) -> None:
        started.set()

    result = asyncio.ensure_future(call.result(on_progress=on_progress))
    try:
        progress = asyncio.ensure_future(started.wait())
        done, _ = await asyncio.wait({result, progress}, timeout=start_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        progress.cancel()
        if not done:
            raise StartTimeout(f"no model replica took the request within {start_timeout_s:g} s")
        return await result
    finally:
        result.cancel()


async def _first_event(call: GenerationCall, wait_s: float, user_timeout: bool):
    """The call's first event within `wait_s`: a `QueueTimeout` past it, or the client's `StartTimeout`."""
    try:
        return await asyncio.wait_for(anext(call), wait_s)
    except TimeoutError:
        if user_timeout:
            raise StartTimeout(f"no model replica took the request within {wait_s:g} s") from None
        raise


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
