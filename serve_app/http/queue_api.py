"""fal's queue API at the ingress: submit, status (polled or streamed), result, cancel, result files.

Bodies are the `serve_app.contract.queue` models, exactly what `fal_client` and `@fal-ai/client`
parse. Status comes from this replica's `JobMirror`, so the ten polls a second each waiting
`fal_client` makes never leave the ingress; a poll for an id nobody knows is remembered as unknown for
a few seconds, so neither does a client polling nonsense. A job belongs to the API key that submitted
it: for anyone else every route answers exactly as for an unknown id.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray.serve.handle import DeploymentHandle
from sse_starlette import EventSourceResponse, ServerSentEvent

from serve_app.config import AppConfig
from serve_app.contract.errors import (
    AlreadyCompleted,
    NotCompleted,
    NotFound,
    ValidationFailed,
    from_body,
)
from serve_app.contract.queue import CancelAccepted, JobUrls, QueueMetrics, QueueStatus, QueueSubmitted
from serve_app.contract.requests import ResolvedRequest
from serve_app.generation.ray_errors import from_ray
from serve_app.http.errors import error_response
from serve_app.http.middleware import CLIENT_SCOPE_KEY, ApiKeys, ClientLedger, request_owner
from serve_app.http.preview_fanout import PreviewFanout
from serve_app.http.sse import SEPARATOR, keepalive_comment
from serve_app.queue.dispatcher import Submitted
from serve_app.queue.feed import JobMirror
from serve_app.queue.outputs import parse_lifecycle
from serve_app.queue.records import JobRecord
from serve_app.queue.store import FeedChanges, JobSnapshot
from serve_app.queue.webhooks import check_webhook_url
from serve_app.waiting import wait_any

LOG_FLAGS = {"1": True, "true": True, "0": False, "false": False}
PRIORITIES = {"normal": 0, "low": 1}  # fal's X-Fal-Queue-Priority: a low job waits behind every normal one
FILES_PREFIX = "/files/"
UNKNOWN_IDS_KEPT = 10_000
UNKNOWN_FOR_S = 10.0  # job ids are made by the queue: one unknown now cannot become known later
JWKS_KEPT_S = 60.0
EVENT_ID = re.compile(r"(\d{1,9})\.(\d{1,20}-\d{1,20})?")


class QueueApi:
    def __init__(
        self,
        job_queue: DeploymentHandle,
        config: AppConfig,
        keys: ApiKeys | None = None,
        ledger: ClientLedger | None = None,
    ) -> None:
        self._queue = job_queue
        self._app_id = config.app_id
        self._webhook_allowed_hosts = config.queue.webhook_allowed_hosts
        self._keepalive_s = config.http.keepalive_s
        self._keys = keys or ApiKeys([])
        self.ledger = ledger  # set when the per-client limit is on: submits record their jobs in it
        self._mirror = JobMirror(
            self._fetch_changes, self._audit, finished_ttl_s=config.queue.result_ttl_s, lease_s=config.queue.lease_s
        )
        self._unknown: OrderedDict[str, float] = OrderedDict()  # id -> until when it answers 404 from here
        self._jwks: tuple[float, dict] | None = None  # (until when, the key set)
        self._previews = PreviewFanout(
            lambda request_id, after, timeout_s: self._ask("previews", request_id, after, timeout_s)
        )

    async def _ask(self, method: str, *args: Any) -> Any:
        """Call the job queue; its failures as catalog errors."""
        try:
            return await getattr(self._queue, method).remote(*args)
        except Exception as error:
            raise from_ray(error) from error

    async def _fetch_changes(self, epoch: str, since: int, queue_since: int, timeout_s: float) -> FeedChanges:
        return await self._queue.changes.remote(epoch, since, queue_since, timeout_s)

    async def _audit(self, held: list[JobSnapshot]) -> list[JobSnapshot]:
        return await self._queue.audit.remote(held)

    async def submit(self, body: ResolvedRequest, request: Request, webhook: str | None) -> Response:
        self._mirror.start()
        if webhook is not None:
            check_webhook_url(webhook, self._webhook_allowed_hosts)
        priority = _priority(request.headers.get("x-fal-queue-priority"))
        owner = request_owner(self._keys, request.headers)
        base_url = str(request.base_url).rstrip("/")
        keep_files = parse_lifecycle(request.headers.get("x-fal-object-lifecycle-preference"))
        submitted: Submitted = await self._ask(
            "submit", body, webhook, owner, priority, start_timeout_s(request), base_url, keep_files
        )
        request_id = submitted.snapshot.request_id
        self._mirror.remember(submitted.snapshot, submitted.position)
        if self.ledger is not None and CLIENT_SCOPE_KEY in request.scope:
            self.ledger.add_job(request.scope[CLIENT_SCOPE_KEY], request_id)
        answer = QueueSubmitted(
            request_id=request_id, queue_position=submitted.position, **self._urls(request, request_id)
        )
        return _json(answer.model_dump_json(), headers={"x-fal-request-id": request_id})

    async def status(self, request_id: str, request: Request, logs: str | None) -> Response:
        snapshot = await self._snapshot(request_id, request)
        return _json(self._status(snapshot, request, _log_flag(logs)).wire())

    async def status_stream(
        self, request_id: str, request: Request, logs: str | None, previews: str | None = None
    ) -> Response:
        snapshot = await self._snapshot(request_id, request)  # unknown: 404 before the stream starts
        with_logs = _log_flag(logs)
        if _flag(previews, "previews"):
            cursor = ViewerCursor.parse(request.headers.get("last-event-id"))
            events = self._watched_events(snapshot, request, with_logs, cursor)
        else:
            events = self._status_events(snapshot, request, with_logs)
        return EventSourceResponse(
            events,
            ping=self._keepalive_s,
            ping_message_factory=keepalive_comment,
            sep=SEPARATOR,
        )

    async def result(self, request_id: str, request: Request) -> Response:
        record: JobRecord | None = await self._ask("result", request_id)
        if record is None or record.owner != request_owner(self._keys, request.headers):
            raise NotFound(f"no request {request_id}")
        headers = {"x-fal-request-id": request_id}
        if record.state != "COMPLETED":
            raise NotCompleted()
        if record.error is not None:
            response = error_response(from_body(record.error))
            response.headers.update(headers)
            return response
        return JSONResponse(_absolute_files(record.result or {}, request), headers=headers)

    async def cancel(self, request_id: str, request: Request) -> Response:
        outcome = await self._ask("cancel", request_id, request_owner(self._keys, request.headers))
        if outcome == "unknown":
            raise NotFound(f"no request {request_id}")
        if outcome == "completed":
            raise AlreadyCompleted()
        return _json(CancelAccepted().model_dump_json(), status_code=202)

    async def file(self, key: str) -> Response:
        found = await self._ask("file", key)
        if found is None:
            raise NotFound("no such file (expired: X-Fal-Object-Lifecycle-Preference, or queue.outputs_*)")
        data, content_type = found
        return Response(data, media_type=content_type, headers={"cache-control": "private, max-age=3600"})

    async def jwks(self) -> Response:
        """The public key webhooks are signed with, from the job queue, kept a minute."""
        if self._jwks is None or self._jwks[0] < time.monotonic():
            self._jwks = (time.monotonic() + JWKS_KEPT_S, await self._ask("jwks"))
        return JSONResponse(self._jwks[1], headers={"cache-control": f"public, max-age={int(JWKS_KEPT_S)}"})

    def in_flight(self, request_id: str) -> bool:
        """Whether a job is still queued or running, from this replica's mirror (nothing leaves the
        ingress); a job the mirror no longer holds has completed."""
        snapshot = self._mirror.get(request_id)
        return snapshot is not None and snapshot.state != "COMPLETED"

    async def _snapshot(self, request_id: str, request: Request) -> JobSnapshot:
        """From the mirror; a job it has not heard of yet (submitted through another replica a moment
        ago, or finished before a restart) costs one call to the job queue, an unknown id one call per
        `UNKNOWN_FOR_S`. Another owner's job is unknown."""
        self._mirror.start()
        snapshot = self._mirror.get(request_id)
        if snapshot is None:
            if self._unknown.get(request_id, 0.0) > time.monotonic():
                raise NotFound(f"no request {request_id}")
            snapshot = await self._ask("snapshot", request_id)
            if snapshot is None:
                self._remember_unknown(request_id)
                raise NotFound(f"no request {request_id}")
            self._mirror.remember(snapshot)
        if snapshot.owner != request_owner(self._keys, request.headers):
            raise NotFound(f"no request {request_id}")
        return snapshot

    def _remember_unknown(self, request_id: str) -> None:
        self._unknown.pop(request_id, None)
        self._unknown[request_id] = time.monotonic() + UNKNOWN_FOR_S
        while len(self._unknown) > UNKNOWN_IDS_KEPT:
            self._unknown.popitem(last=False)

    async def _status_events(
        self, snapshot: JobSnapshot, request: Request, with_logs: bool
    ) -> AsyncIterator[ServerSentEvent]:
        """Each change of the job's status, logs sent once each (the JS client accumulates them),
        ending after COMPLETED."""
        sent_logs, last = 0, None
        while True:
            status = self._status(snapshot, request, with_logs)
            if with_logs:
                status.logs = snapshot.logs[sent_logs:]
                sent_logs = len(snapshot.logs)
            body = status.wire()
            if body != last:
                yield ServerSentEvent(body, sep=SEPARATOR)
                last = body
            if snapshot.state == "COMPLETED":
                return
            await self._mirror.wait_for_change(self._keepalive_s)
            snapshot = self._mirror.get(snapshot.request_id) or snapshot

    async def _watched_events(
        self, snapshot: JobSnapshot, request: Request, with_logs: bool, cursor: ViewerCursor
    ) -> AsyncIterator[ServerSentEvent]:
        """The status events of `_status_events` and, between them, the running job's previews, each
        event with the cursor's id (logs sent, last preview sent) to resume from."""
        last = None
        async with self._previews.watch(snapshot.request_id) as previews:
            while True:
                status = self._status(snapshot, request, with_logs)
                if with_logs:
                    status.logs = snapshot.logs[cursor.logs :]
                    cursor.logs = len(snapshot.logs)
                body = status.wire()
                if body != last:
                    yield ServerSentEvent(body, id=cursor.event_id(), sep=SEPARATOR)
                    last = body
                if snapshot.state == "COMPLETED":
                    return
                for entry_id, event_json in previews.after(cursor.preview):
                    cursor.preview = entry_id
                    yield ServerSentEvent(event_json, id=cursor.event_id(), sep=SEPARATOR)
                changed = previews.changed
                if not previews.after(cursor.preview):
                    await wait_any(changed, self._mirror.changed_event(), self._keepalive_s)
                snapshot = self._mirror.get(snapshot.request_id) or snapshot

    def _status(self, snapshot: JobSnapshot, request: Request, with_logs: bool) -> QueueStatus:
        status = QueueStatus(
            status=snapshot.state,
            request_id=snapshot.request_id,
            logs=snapshot.logs if with_logs else None,  # fal_client requires the key (null without logs)
            **self._urls(request, snapshot.request_id),
        )
        position = self._mirror.position(snapshot.request_id)
        if snapshot.state == "IN_QUEUE":
            status.queue_position = position if position is not None else 0
        elif position is not None and not snapshot.generating:  # claimed, waiting for a model replica
            status.status, status.queue_position = "IN_QUEUE", position
        if snapshot.state == "COMPLETED":
            status.metrics = QueueMetrics(inference_time=snapshot.inference_time)
            if snapshot.error is not None:
                status.error, status.error_type = str(snapshot.error.detail), snapshot.error.error_type
        return status

    def _urls(self, request: Request, request_id: str) -> dict:
        base = f"{str(request.base_url).rstrip('/')}/queue/{self._app_id}/requests/{request_id}"
        return JobUrls(response_url=base, status_url=f"{base}/status", cancel_url=f"{base}/cancel").model_dump()


def _json(body: str, status_code: int = 200, headers: dict | None = None) -> Response:
    """A model already dumped to JSON (the route's `response_model` documents it; nothing re-validates it)."""
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


def start_timeout_s(request: Request) -> float | None:
    """fal's `X-Fal-Request-Timeout` (`fal_client`'s `start_timeout=`): seconds the request may wait, the
    queue included, before it starts; past it, it ends 504 `start_timeout` and never runs."""
    header = request.headers.get("x-fal-request-timeout")
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValidationFailed("X-Fal-Request-Timeout must be a number of seconds above 0")
    return seconds


def _priority(header: str | None) -> int:
    if header is None:
        return PRIORITIES["normal"]
    if header.lower() not in PRIORITIES:
        raise ValidationFailed("X-Fal-Queue-Priority must be normal or low")
    return PRIORITIES[header.lower()]


def _log_flag(logs: str | None) -> bool:
    return _flag(logs, "logs")


def _flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    if value.lower() not in LOG_FLAGS:
        raise ValidationFailed(f"{name} must be one of 0, 1, true, false")
    return LOG_FLAGS[value.lower()]


@dataclass
class ViewerCursor:
    """Where a watcher of a job is: log lines sent, the last preview's entry id. It is each event's SSE
    `id` (`<logs>.<preview id>`), which an EventSource sends back as `Last-Event-ID` when it reconnects."""

    logs: int = 0
    preview: str = ""

    @classmethod
    def parse(cls, last_event_id: str | None) -> ViewerCursor:
        if not last_event_id:
            return cls()
        match = EVENT_ID.fullmatch(last_event_id.strip())
        if match is None:
            raise ValidationFailed("Last-Event-ID must be an id this stream sent (`<logs>.<preview id>`)")
        return cls(logs=int(match[1]), preview=match[2] or "")

    def event_id(self) -> str:
        return f"{self.logs}.{self.preview}"


def _absolute_files(result: dict, request: Request) -> dict:
    """Stored images' paths as URLs on the host the client used."""
    base = str(request.base_url).rstrip("/")
    for image in result.get("images", []):
        if image["url"].startswith(FILES_PREFIX):
            image["url"] = base + image["url"]
    return result
