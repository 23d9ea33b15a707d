"""The job-queue deployment: owns fal queue jobs and dispatches them to the SDXL deployment.

It claims jobs from the store (memory or Redis) with a lease it keeps renewing while the job
runs, so a job held by a replica that died goes back to the queue. It dispatches no more jobs
than the SDXL replicas can run, plus `DISPATCH_AHEAD` waiting at the handle, so streams and jobs
share the GPUs and queued jobs show up as load to Serve's autoscaler. A dispatched job that has
not started is still `IN_QUEUE`, ahead of those in the store. Status reaches the ingress replicas
through the `JobFeed` they follow.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serve_app.config import AppConfig
from serve_app.errors import Cancelled, InternalError, ServiceError, classify, from_body
from serve_app.jobs import JobError, JobRecord, JobStore, open_job_store
from serve_app.jobs.feed import JobFeed, JobSnapshot
from serve_app.jobs.webhooks import deliver, webhook_payload
from serve_app.metrics import JobQueueMetrics
from serve_app.schemas import ErrorBody, FinalEvent

logger = logging.getLogger("ray.serve")

DISPATCH_AHEAD = 1  # jobs waiting at the SDXL handle beyond the free slots: the autoscaler's signal
DISPATCH_POLL_S = 0.5  # how often the queue is checked without a wake-up (claims by other replicas, leases)
CAPACITY_CHECK_S = 2.0
BACKPRESSURE_RETRY_S = 1.0


@dataclass
class _Dispatched:
    record: JobRecord
    call: DeploymentResponseGenerator | None = None
    started: bool = False
    cancelled: bool = False
    task: asyncio.Task | None = field(default=None, repr=False)


def fal_log(message: str, level: str = "INFO") -> dict:
    """One of fal's log objects."""
    timestamp = datetime.now(timezone.utc).isoformat()  # noqa: UP017 - Python 3.10 has no datetime.UTC
    return {"message": message, "level": level, "source": "USER", "timestamp": timestamp}


@serve.deployment
class JobQueue:
    async def __init__(self, sdxl: DeploymentHandle, config: AppConfig) -> None:
        self._sdxl = sdxl
        self._config = config
        self._store: JobStore = open_job_store(
            _redis_url(config), app_id=config.app_id, result_ttl_s=config.job_result_ttl_s
        )
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._feed = JobFeed(finished_ttl_s=config.job_result_ttl_s)
        self._metrics = JobQueueMetrics()
        self._dispatched: dict[str, _Dispatched] = {}  # in dispatch order
        self._capacity = (0.0, 1)  # (checked at, jobs the SDXL replicas can run)
        self._wake = asyncio.Event()
        self._dispatching = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        await self._load_unfinished()
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_forever())

    # --- called by the ingress ---------------------------------------------------------------

    async def submit(self, request: dict, webhook_url: str | None) -> dict:
        """Queue a job; its snapshot and 0-based position. Raises `Overloaded` when the queue is full."""
        record = JobRecord(app_id=self._config.app_id, request=request, webhook_url=webhook_url)
        record.logs.append(fal_log("Queued"))
        try:
            position = await self._store.submit(record, self._config.max_queued_jobs)
        except Exception as error:
            raise classify(error) from error
        self._feed.put(JobSnapshot.of(record))
        await self._dispatch_once()  # dispatched now if a replica can take it: positions are settled
        queued = self._feed.queued()
        position = queued.index(record.request_id) if record.request_id in queued else 0
        return {"snapshot": JobSnapshot.of(record).model_dump(), "position": position}

    async def changes(self, epoch: str, since: int, timeout_s: float) -> dict:
        """The feed the ingress replicas follow (a long poll)."""
        return (await self._feed.changes(epoch, since, timeout_s)).model_dump()

    async def snapshot(self, request_id: str) -> dict | None:
        """A job the caller's mirror does not know (yet): from the feed, else from the store."""
        snapshot = self._feed.get(request_id)
        if snapshot is None:
            record = await self._store.get(request_id)
            snapshot = JobSnapshot.of(record) if record else None
        return snapshot.model_dump() if snapshot else None

    async def result(self, request_id: str) -> dict | None:
        """The record of a job (with its result or error); None when unknown or expired."""
        record = await self._store.get(request_id)
        return record.model_dump() if record else None

    async def file(self, key: str) -> tuple[bytes, str] | None:
        return await self._store.get_file(key)

    async def cancel(self, request_id: str) -> str:
        """fal's cancel: "removed" (was queued), "requested" (running: stops at the next step),
        "completed" or "unknown"."""
        outcome = await self._store.cancel(request_id)
        if outcome == "removed":
            record = await self._store.get(request_id)
            if record is not None:
                self._feed.put(JobSnapshot.of(record))
                await self._after_finish(record)
            await self._publish_queue()
        elif outcome == "requested":
            dispatched = self._dispatched.get(request_id)
            if dispatched is not None:  # else another job-queue replica holds it: it sees the flag on renewal
                dispatched.cancelled = True
                if dispatched.call is not None:
                    dispatched.call.cancel()  # the SDXL replica stops at the next step
        return outcome

    def stats(self) -> dict:
        return {"dispatched": len(self._dispatched), "owner": self._owner}

    # --- dispatching --------------------------------------------------------------------------

    async def _load_unfinished(self) -> None:
        """After a restart (Redis store): publish the jobs still queued or running."""
        for request_id in [*await self._store.running_ids(), *await self._store.queued_ids()]:
            if (record := await self._store.get(request_id)) is not None:
                self._feed.put(JobSnapshot.of(record))
        await self._publish_queue()

    async def _dispatch_forever(self) -> None:
        while True:
            try:
                await self._dispatch_once()
            except Exception:  # noqa: BLE001 - e.g. Redis briefly away: keep dispatching once it is back
                logger.exception("Dispatching jobs failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), DISPATCH_POLL_S)

    async def _dispatch_once(self) -> None:
        """Requeue jobs of dead owners, claim what the replicas can take, publish the queue order."""
        async with self._dispatching:  # the loop and submits: one pass at a time, or both could over-claim
            for request_id in await self._store.reclaim_expired(self._config.job_max_attempts):
                record = await self._republish(request_id)
                if record is not None and record.state == "COMPLETED":  # gave up after job_max_attempts
                    await self._after_finish(record)
            # Only with a backlog: counting replicas asks the controller (tens of ms of CPU).
            capacity = await self._current_capacity() if await self._store.queued_ids() else 0
            while len(self._dispatched) < capacity + DISPATCH_AHEAD:
                record = await self._store.claim(self._owner, self._config.job_lease_s)
                if record is None:
                    break
                self._dispatch(record)
            await self._publish_queue()

    def _dispatch(self, record: JobRecord) -> None:
        dispatched = _Dispatched(record)
        self._dispatched[record.request_id] = dispatched
        dispatched.task = asyncio.get_running_loop().create_task(self._run(dispatched))

    async def _run(self, dispatched: _Dispatched) -> None:
        record = dispatched.record
        lease = asyncio.get_running_loop().create_task(self._keep_lease(dispatched))
        error: ServiceError | None = None
        result: dict | None = None
        try:
            result, error = await self._generate(dispatched)
        except Exception as failure:  # noqa: BLE001 - every job ends COMPLETED, with a result or an error
            logger.exception("Job %s failed", record.request_id)
            error = classify(failure)
        finally:
            lease.cancel()
            self._dispatched.pop(record.request_id, None)
            self._wake.set()
        inference_time = result["timings"]["inference"] if result else None
        job_error = JobError.of(error) if error else None
        if await self._store.finish(
            record.request_id, self._owner, result=result, error=job_error, inference_time=inference_time
        ):
            done = await self._store.get(record.request_id)
            if done is not None:
                self._feed.put(JobSnapshot.of(done))
                await self._after_finish(done)
        else:  # the lease was lost: whoever completed the job sent its webhook and counted it
            await self._republish(record.request_id)

    async def _generate(self, dispatched: _Dispatched) -> tuple[dict | None, ServiceError | None]:
        """Run the job on an SDXL replica; (result, None) or (None, error)."""
        record = dispatched.record
        while True:
            if dispatched.cancelled:
                return None, Cancelled("the job was cancelled")
            dispatched.call = self._sdxl.options(stream=True).generate.remote(
                record.request, previews=False, progress=True
            )
            try:
                async for event in dispatched.call:
                    if not dispatched.started:
                        await self._mark_started(dispatched)
                    if event["type"] == "progress":
                        await self._log(record, f"step {event['step'] + 1}/{event['num_inference_steps']}")
                    elif event["type"] == "final":
                        await self._log(record, "Completed")
                        return await self._stored_result(record, FinalEvent.model_validate(event)), None
                    elif event["type"] == "error":
                        return None, from_body(ErrorBody.model_validate(event))
                return None, InternalError("the generation ended without a result")
            except BackPressureError:
                await asyncio.sleep(BACKPRESSURE_RETRY_S)  # every SDXL queue is full of streams: wait, still queued
            except (RequestCancelledError, asyncio.CancelledError):
                if dispatched.cancelled:
                    return None, Cancelled("the job was cancelled while running")
                raise
            except RayActorError:
                return None, classify(RayActorError())

    async def _mark_started(self, dispatched: _Dispatched) -> None:
        dispatched.started = True
        self._metrics.wait.observe(max(0.0, time.time() - dispatched.record.submitted_at))
        dispatched.record.logs.append(fal_log("Started"))
        await self._store.append_logs(dispatched.record.request_id, [dispatched.record.logs[-1]])
        self._feed.put(JobSnapshot.of(dispatched.record, state="IN_PROGRESS"))
        await self._publish_queue()

    async def _log(self, record: JobRecord, message: str) -> None:
        record.logs.append(fal_log(message))
        await self._store.append_logs(record.request_id, [record.logs[-1]])
        self._feed.put(JobSnapshot.of(record, state="IN_PROGRESS"))

    async def _stored_result(self, record: JobRecord, final: FinalEvent) -> dict:
        """fal's result: with `sync_mode` the images inline as data URIs, else stored and linked by a
        path the ingress makes absolute (`/files/...`) with the host the client used."""
        result = final.result()
        if not record.request.get("sync_mode"):
            for index, image in enumerate(result.images):
                header, data = image.url.split(",", 1)
                extension = image.content_type.split("/")[1]
                key = f"{record.request_id}/{index}.{extension}"
                await self._store.put_file(key, base64.b64decode(data), image.content_type)
                image.url = f"/files/{key}"
        return result.model_dump()

    async def _keep_lease(self, dispatched: _Dispatched) -> None:
        """Renew the job's lease until it ends; a lost lease (or a cancel through another replica) stops it."""
        request_id = dispatched.record.request_id
        while True:
            await asyncio.sleep(self._config.job_lease_s / 3)
            kept = await self._store.renew(request_id, self._owner, self._config.job_lease_s)
            record = await self._store.get(request_id)
            if not kept or (record is not None and record.cancel_requested):
                dispatched.cancelled = dispatched.cancelled or (record is not None and record.cancel_requested)
                if dispatched.call is not None:
                    dispatched.call.cancel()
                if not kept:
                    return

    async def _current_capacity(self) -> int:
        """Running SDXL replicas (each runs one generation at a time), checked every few seconds."""
        checked_at, capacity = self._capacity
        if time.monotonic() - checked_at > CAPACITY_CHECK_S:
            capacity = max(1, await asyncio.to_thread(self._running_sdxl_replicas))
            self._capacity = (time.monotonic(), capacity)
        return capacity

    def _running_sdxl_replicas(self) -> int:
        deployment = self._sdxl.deployment_id
        application = serve.status().applications.get(deployment.app_name)
        status = application.deployments.get(deployment.name) if application else None
        return status.replica_states.get("RUNNING", 0) if status else 0

    async def _publish_queue(self) -> None:
        waiting = [request_id for request_id, job in self._dispatched.items() if not job.started]
        queued = waiting + await self._store.queued_ids()
        self._feed.set_queue(queued)
        self._metrics.queue_depth.set(len(queued))

    async def _republish(self, request_id: str) -> JobRecord | None:
        """Publish the store's record of a job that another path changed."""
        if (record := await self._store.get(request_id)) is not None:
            self._feed.put(JobSnapshot.of(record))
        return record

    async def _after_finish(self, record: JobRecord) -> None:
        error_type = record.error.error_type if record.error else ""
        outcome = "completed" if record.error is None else "cancelled" if error_type == "cancelled" else "failed"
        self._metrics.jobs.inc(tags={"outcome": outcome, "error_type": error_type})
        if record.webhook_url:
            self._spawn(
                deliver(
                    record.webhook_url,
                    webhook_payload(record),
                    self._config.webhook_timeout_s,
                    self._config.webhook_attempts,
                )
            )

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._background.discard)


def _redis_url(config: AppConfig) -> str | None:
    if config.job_store == "memory":
        return None
    url = os.environ.get(config.redis_url_env)
    if not url:
        raise ValueError(f"job_store is 'redis' but the environment variable {config.redis_url_env} is not set")
    return url
