"""The job queue's logic, without Serve: owns fal queue jobs and runs them through a generation client.

It claims jobs from the store (memory or Redis) with a lease it keeps renewing while the job
runs, so a job held by a replica that died goes back to the queue. It dispatches no more jobs
than the model replicas can run, plus `DISPATCH_AHEAD` waiting for one, so streams and jobs share
the GPUs and queued jobs show up as load to Serve's autoscaler. A dispatched job that has not
started is still `IN_QUEUE`, ahead of those in the store. Status reaches the ingress replicas
through the `JobFeed` they follow. `serve_app.queue.job_queue.JobQueue` is its Serve deployment.
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

from pydantic import BaseModel

from serve_app.config import QueueConfig
from serve_app.contract.errors import Cancelled, Overloaded, ServiceError, as_service_error
from serve_app.contract.events import QUEUE_JOB, FinalEvent, ProgressEvent
from serve_app.contract.queue import LogEntry
from serve_app.contract.requests import ResolvedRequest
from serve_app.generation.client import GenerationCall, GenerationClient
from serve_app.queue.feed import FeedChanges, JobFeed, JobSnapshot
from serve_app.queue.metrics import QueueMetrics
from serve_app.queue.records import CancelOutcome, JobRecord
from serve_app.queue.store import JobStore
from serve_app.queue.webhooks import deliver, webhook_payload

logger = logging.getLogger("ray.serve")

DISPATCH_AHEAD = 1  # jobs waiting for a model replica beyond the free ones: the autoscaler's signal
DISPATCH_POLL_S = 0.5  # how often the queue is checked without a wake-up (claims by other replicas, leases)
OVERLOAD_RETRY_S = 1.0


class Submitted(BaseModel):
    """A job just queued: its first snapshot and 0-based position."""

    snapshot: JobSnapshot
    position: int


@dataclass
class _Dispatched:
    record: JobRecord
    call: GenerationCall | None = None
    started: bool = False
    cancelled: bool = False
    task: asyncio.Task | None = field(default=None, repr=False)


class JobDispatcher:
    def __init__(
        self,
        store: JobStore,
        generation: GenerationClient,
        config: QueueConfig,
        app_id: str,
        metrics: QueueMetrics | None = None,
    ) -> None:
        self._store = store
        self._generation = generation
        self._config = config
        self._app_id = app_id
        self._metrics = metrics or QueueMetrics()
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.feed = JobFeed(finished_ttl_s=config.result_ttl_s)
        self._dispatched: dict[str, _Dispatched] = {}  # in dispatch order
        self._wake = asyncio.Event()
        self._dispatching = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Publish the jobs the store already holds (after a restart), then dispatch until `close`."""
        await self._load_unfinished()
        self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_forever())

    async def close(self) -> None:
        """Stop dispatching and running jobs (their leases lapse; another replica takes them over)."""
        tasks = [self._loop_task, *(job.task for job in self._dispatched.values()), *self._background]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(task for task in tasks if task is not None), return_exceptions=True)

    # --- the queue API -----------------------------------------------------------------------

    async def submit(self, request: ResolvedRequest, webhook_url: str | None) -> Submitted:
        """Queue a job. Raises `Overloaded` when the queue is full."""
        record = JobRecord(app_id=self._app_id, request=request.model_dump(), webhook_url=webhook_url)
        record.logs.append(LogEntry.now("Queued"))
        await self._store.submit(record, self._config.max_queued)
        self.feed.put(JobSnapshot.of(record))
        await self._dispatch_once()  # dispatched now if a replica can take it: positions are settled
        queued = self.feed.queued()
        position = queued.index(record.request_id) if record.request_id in queued else 0
        return Submitted(snapshot=JobSnapshot.of(record), position=position)

    async def changes(self, epoch: str, since: int, timeout_s: float) -> FeedChanges:
        """The feed the ingress replicas follow (a long poll)."""
        return await self.feed.changes(epoch, since, timeout_s)

    async def snapshot(self, request_id: str) -> JobSnapshot | None:
        """A job the caller's mirror does not know (yet): from the feed, else from the store."""
        snapshot = self.feed.get(request_id)
        if snapshot is None:
            record = await self._store.get(request_id)
            snapshot = JobSnapshot.of(record) if record else None
        return snapshot

    async def result(self, request_id: str) -> JobRecord | None:
        """The record of a job (with its result or error); None when unknown or expired."""
        return await self._store.get(request_id)

    async def file(self, key: str) -> tuple[bytes, str] | None:
        return await self._store.get_file(key)

    async def cancel(self, request_id: str) -> CancelOutcome:
        """fal's cancel: "removed" (was queued), "requested" (running: stops at the next step),
        "completed" or "unknown"."""
        outcome = await self._store.cancel(request_id)
        if outcome == "removed":
            record = await self._store.get(request_id)
            if record is not None:
                self.feed.put(JobSnapshot.of(record))
                await self._after_finish(record)
            await self._publish_queue()
        elif outcome == "requested":
            dispatched = self._dispatched.get(request_id)
            if dispatched is not None:  # else another job-queue replica holds it: it sees the flag on renewal
                dispatched.cancelled = True
                if dispatched.call is not None:
                    dispatched.call.cancel()  # the model replica stops at the next step
        return outcome

    def stats(self) -> dict:
        return {"dispatched": len(self._dispatched), "owner": self.owner}

    # --- dispatching --------------------------------------------------------------------------

    async def _load_unfinished(self) -> None:
        """After a restart (Redis store): publish the jobs still queued or running."""
        for request_id in [*await self._store.running_ids(), *await self._store.queued_ids()]:
            if (record := await self._store.get(request_id)) is not None:
                self.feed.put(JobSnapshot.of(record))
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
            for request_id in await self._store.reclaim_expired(self._config.max_attempts):
                record = await self._republish(request_id)
                if record is not None and record.state == "COMPLETED":  # gave up after max_attempts
                    await self._after_finish(record)
            # Only with a backlog: counting replicas may ask the controller.
            capacity = max(1, await self._generation.ready_replicas()) if await self._store.queued_ids() else 0
            while len(self._dispatched) < capacity + DISPATCH_AHEAD:
                record = await self._store.claim(self.owner, self._config.lease_s)
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
            error = as_service_error(failure)
        finally:
            lease.cancel()
            self._dispatched.pop(record.request_id, None)
            self._wake.set()
        inference_time = result["timings"]["inference"] if result else None
        job_error = error.body() if error else None
        if await self._store.finish(
            record.request_id, self.owner, result=result, error=job_error, inference_time=inference_time
        ):
            done = await self._store.get(record.request_id)
            if done is not None:
                self.feed.put(JobSnapshot.of(done))
                await self._after_finish(done)
        else:  # the lease was lost: whoever completed the job sent its webhook and counted it
            await self._republish(record.request_id)

    async def _generate(self, dispatched: _Dispatched) -> tuple[dict | None, ServiceError | None]:
        """Run the job on a model replica; (result, None) or (None, error)."""
        record = dispatched.record
        request = ResolvedRequest.model_validate(record.request)

        async def on_progress(event: ProgressEvent) -> None:
            await self._log(dispatched, f"step {event.step + 1}/{event.num_inference_steps}")

        while True:
            if dispatched.cancelled:
                return None, Cancelled("the job was cancelled")
            dispatched.call = self._generation.events(request, QUEUE_JOB)
            try:
                final = await dispatched.call.result(on_progress=on_progress)
            except asyncio.CancelledError:  # this replica stops: so does the generation
                dispatched.call.cancel()
                raise
            except Overloaded:
                await asyncio.sleep(OVERLOAD_RETRY_S)  # every model queue is full of streams: wait, still queued
                continue
            except ServiceError as error:
                if dispatched.cancelled:
                    return None, Cancelled("the job was cancelled while running")
                return None, error
            await self._log(dispatched, "Completed")
            return await self._stored_result(record, final), None

    async def _log(self, dispatched: _Dispatched, message: str) -> None:
        """A log line for a running job; the first one marks it started."""
        record = dispatched.record
        if not dispatched.started:
            dispatched.started = True
            self._metrics.waited(max(0.0, time.time() - record.submitted_at))
            await self._append_log(record, "Started")
            await self._publish_queue()
        await self._append_log(record, message)

    async def _append_log(self, record: JobRecord, message: str) -> None:
        record.logs.append(LogEntry.now(message))
        await self._store.append_logs(record.request_id, [record.logs[-1]])
        self.feed.put(JobSnapshot.of(record, state="IN_PROGRESS"))

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
            await asyncio.sleep(self._config.lease_s / 3)
            kept = await self._store.renew(request_id, self.owner, self._config.lease_s)
            record = await self._store.get(request_id)
            if not kept or (record is not None and record.cancel_requested):
                dispatched.cancelled = dispatched.cancelled or (record is not None and record.cancel_requested)
                if dispatched.call is not None:
                    dispatched.call.cancel()
                if not kept:
                    return

    async def _publish_queue(self) -> None:
        waiting = [request_id for request_id, job in self._dispatched.items() if not job.started]
        queued = waiting + await self._store.queued_ids()
        self.feed.set_queue(queued)
        self._metrics.queue_depth(len(queued))

    async def _republish(self, request_id: str) -> JobRecord | None:
        """Publish the store's record of a job that another path changed."""
        if (record := await self._store.get(request_id)) is not None:
            self.feed.put(JobSnapshot.of(record))
        return record

    async def _after_finish(self, record: JobRecord) -> None:
        error_type = record.error.error_type if record.error else ""
        outcome = "completed" if record.error is None else "cancelled" if error_type == "cancelled" else "failed"
        self._metrics.job_finished(outcome, error_type)
        if record.webhook_url:
            payload = webhook_payload(record)
            self._spawn(
                deliver(record.webhook_url, payload, self._config.webhook_timeout_s, self._config.webhook_attempts)
            )

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._background.discard)
