"""fal's queue API at the ingress: submit, status (polled or streamed), result, cancel, result files.

Bodies are exactly what `fal_client` and `@fal-ai/client` parse. Status comes from this replica's
`JobMirror`, so the ten polls a second each waiting `fal_client` makes never leave the ingress.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray.serve.handle import DeploymentHandle
from sse_starlette import EventSourceResponse, ServerSentEvent

from serve_app.config import AppConfig
from serve_app.errors import AlreadyCompleted, NotCompleted, NotFound, ValidationFailed, classify
from serve_app.jobs.feed import JobMirror, JobSnapshot
from serve_app.jobs.records import JobRecord
from serve_app.jobs.webhooks import check_webhook_url
from serve_app.schemas import GenerationRequest
from serve_app.sse import SEPARATOR, keepalive_comment

LOG_FLAGS = {"1": True, "true": True, "0": False, "false": False}
FILES_PREFIX = "/files/"


class JobGateway:
    def __init__(self, job_queue: DeploymentHandle, config: AppConfig) -> None:
        self._queue = job_queue
        self._config = config
        self._mirror = JobMirror(self._fetch_changes, finished_ttl_s=config.job_result_ttl_s)

    async def _fetch_changes(self, epoch: str, since: int, timeout_s: float) -> dict:
        return await self._queue.changes.remote(epoch, since, timeout_s)

    async def submit(self, body: GenerationRequest, request: Request, webhook: str | None) -> Response:
        self._mirror.start()
        if webhook is not None:
            check_webhook_url(webhook, self._config.webhook_allowed_hosts)
        body = self._config.apply_request_defaults(body)
        try:
            submitted = await self._queue.submit.remote(body.model_dump(), webhook)
        except Exception as error:
            raise classify(error) from error
        snapshot = JobSnapshot.model_validate(submitted["snapshot"])
        self._mirror.remember(snapshot, submitted["position"])
        content = {
            "request_id": snapshot.request_id,
            "status": "IN_QUEUE",
            "queue_position": submitted["position"],
            **self._urls(request, snapshot.request_id),
        }
        return JSONResponse(content, headers={"x-fal-request-id": snapshot.request_id})

    async def status(self, request_id: str, request: Request, logs: str | None) -> Response:
        snapshot = await self._snapshot(request_id)
        return JSONResponse(self._status_body(snapshot, request, _log_flag(logs)))

    async def status_stream(self, request_id: str, request: Request, logs: str | None) -> Response:
        snapshot = await self._snapshot(request_id)  # unknown: 404 before the stream starts
        with_logs = _log_flag(logs)
        return EventSourceResponse(
            self._status_events(snapshot, request, with_logs),
            ping=self._config.keepalive_s,
            ping_message_factory=keepalive_comment,
            sep=SEPARATOR,
        )

    async def result(self, request_id: str, request: Request) -> Response:
        found = await self._queue.result.remote(request_id)
        if found is None:
            raise NotFound(f"no request {request_id}")
        record = JobRecord.model_validate(found)
        headers = {"x-fal-request-id": request_id}
        if record.state != "COMPLETED":
            raise NotCompleted()
        if record.error is not None:
            response = record.error.to_service_error().response()
            response.headers.update(headers)
            return response
        return JSONResponse(_absolute_files(record.result or {}, request), headers=headers)

    async def cancel(self, request_id: str) -> Response:
        outcome = await self._queue.cancel.remote(request_id)
        if outcome == "unknown":
            raise NotFound(f"no request {request_id}")
        if outcome == "completed":
            raise AlreadyCompleted()
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    async def file(self, key: str) -> Response:
        found = await self._queue.file.remote(key)
        if found is None:
            raise NotFound("no such file (results are kept for `job_result_ttl_s`)")
        data, content_type = found
        return Response(data, media_type=content_type, headers={"cache-control": "private, max-age=3600"})

    def in_flight(self, request_id: str) -> bool:
        """Whether a job is still queued or running, from this replica's mirror (nothing leaves the
        ingress); a job the mirror no longer holds has completed."""
        snapshot = self._mirror.get(request_id)
        return snapshot is not None and snapshot.state != "COMPLETED"

    async def _snapshot(self, request_id: str) -> JobSnapshot:
        """From the mirror; a job it has not heard of yet (submitted through another replica a moment
        ago, or finished before a restart) costs one call to the job queue."""
        self._mirror.start()
        snapshot = self._mirror.get(request_id)
        if snapshot is None:
            found = await self._queue.snapshot.remote(request_id)
            if found is None:
                raise NotFound(f"no request {request_id}")
            snapshot = JobSnapshot.model_validate(found)
            self._mirror.remember(snapshot)
        return snapshot

    async def _status_events(
        self, snapshot: JobSnapshot, request: Request, with_logs: bool
    ) -> AsyncIterator[ServerSentEvent]:
        """Each change of the job's status, logs sent once each (the JS client accumulates them),
        ending after COMPLETED."""
        sent_logs, last = 0, None
        while True:
            body = self._status_body(snapshot, request, with_logs)
            if with_logs:
                body["logs"] = snapshot.logs[sent_logs:]
                sent_logs = len(snapshot.logs)
            if body != last:
                yield ServerSentEvent(json.dumps(body), sep=SEPARATOR)
                last = body
            if snapshot.state == "COMPLETED":
                return
            await self._mirror.wait_for_change(self._config.keepalive_s)
            snapshot = self._mirror.get(snapshot.request_id) or snapshot

    def _status_body(self, snapshot: JobSnapshot, request: Request, with_logs: bool) -> dict:
        body: dict = {"status": snapshot.state, "request_id": snapshot.request_id}
        body.update(self._urls(request, snapshot.request_id))
        position = self._mirror.position(snapshot.request_id)
        if snapshot.state == "IN_QUEUE":
            body["queue_position"] = position if position is not None else 0
        elif position is not None:  # claimed, waiting for a replica: still in the queue for the client
            body.update(status="IN_QUEUE", queue_position=position)
        body["logs"] = snapshot.logs if with_logs else None  # fal_client requires the key (null without logs)
        if snapshot.state == "COMPLETED":
            body["metrics"] = {"inference_time": snapshot.inference_time}
            if snapshot.error is not None:
                body.update(error=snapshot.error.detail, error_type=snapshot.error.error_type)
        return body

    def _urls(self, request: Request, request_id: str) -> dict:
        """Absolute, through the host and scheme the client used (fal_client follows them as given)."""
        base = f"{str(request.base_url).rstrip('/')}/queue/{self._config.app_id}/requests/{request_id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


def _log_flag(logs: str | None) -> bool:
    if logs is None:
        return False
    if logs.lower() not in LOG_FLAGS:
        raise ValidationFailed("logs must be one of 0, 1, true, false")
    return LOG_FLAGS[logs.lower()]


def _absolute_files(result: dict, request: Request) -> dict:
    """Stored images' paths as URLs on the host the client used."""
    base = str(request.base_url).rstrip("/")
    for image in result.get("images", []):
        if image["url"].startswith(FILES_PREFIX):
            image["url"] = base + image["url"]
    return result
