"""The job queue's logic, without Serve: owns fal queue jobs and runs them through a generation client.

It claims jobs from the store with a lease it renews while the job runs; the claim's token fences every
write of the run, so a run whose lease another replica took over stops at once and never writes its
result. It dispatches no more jobs than the model replicas can run, plus `DISPATCH_AHEAD` waiting for
one, so streams and jobs share the GPUs and queued jobs show up as load to Serve's autoscaler.

Faults it waits out rather than turning into failures:
- the store not answering: every call on the run path is retried with backoff while the run goes on
  (logs are written behind it); a finished run's result is written when the store answers again;
- a model replica dying under a job: the job goes back to the queue front, and fails only once it has
  taken down `max_attempts` replicas;
- a job-queue replica dying: its leases lapse and another replica requeues its jobs; right after an
  outage no replica requeues anything until it has seen the store answer for a whole lease, so a lease
  that could not be renewed while the store was away is not taken from a live owner;
- the store losing jobs (a restart without persistence, FLUSHDB): what the mirrors still hold is
  checked (`audit`) and completed with `job_lost`; a run that finishes anyway keeps its result.
Webhooks go through the store's outbox: at least once, from whichever replica is up.
`serve_app.queue.job_queue.JobQueue` is its Serve deployment.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel

from serve_app.config import QueueConfig
from serve_app.contract.errors import (
    Cancelled,
    GenerationFailed,
    JobLost,
    Overloaded,
    QueueUnavailable,
    ServiceError,
    as_service_error,
)
from serve_app.contract.events import QUEUE_JOB, WATCHED_QUEUE_JOB, FinalEvent, PreviewEvent, ProgressEvent
from serve_app.contract.queue import LogEntry
from serve_app.contract.requests import ResolvedRequest
from serve_app.generation.client import GenerationCall, GenerationClient
from serve_app.queue.metrics import QueueMetrics
from serve_app.queue.outputs import KeepFor, OutputStore
from serve_app.queue.records import CancelOutcome, JobRecord
from serve_app.queue.store import (
    Claim,
    FeedChanges,
    JobSnapshot,
    JobStore,
    StoreFull,
    StoreUnavailable,
    SubmitRefused,
    WebhookDelivery,
)
from serve_app.queue.webhooks import WebhookSender, webhook_payload
from serve_app.waiting import wait_event

logger = logging.getLogger("ray.serve")

DISPATCH_AHEAD = 1  # jobs waiting for a model replica beyond the free ones: the autoscaler's signal
DISPATCH_POLL_S = 0.5  # how often the queue is checked without a wake-up (other replicas' submits, leases)
VERSION_POLL_S = 0.1  # how often the store's feed version is read: what other replicas changed
OVERLOAD_RETRY_S = 1.0
STORE_BACKOFF_S = (0.05, 2.0)  # first and longest wait between tries while the store does not answer
SWEEP_EVERY_S = 60.0
PREVIEW_POLL_S = 0.25  # how soon a viewer sees a preview written by another job-queue replica
OUTPUTS_SWEEP_EVERY_S = 300.0  # objects expire by the minute; their URLs 404 on expiry whatever the sweep
WEBHOOK_POLL_S = 0.5
INPUTS_KEEP_S = 24 * 3600.0  # a queued job's input images wait this long for it to run
INPUT_NAMES = ("image", "mask")
INPUT_READ_TRIES = 3

T = TypeVar("T")


class Submitted(BaseModel):
    """A job just queued: its first snapshot and 0-based position."""

    snapshot: JobSnapshot
    position: int


@dataclass
class _Run:
    """A claimed job in this replica: its generation, its token, its logs waiting to be written."""

    claim: Claim
    call: GenerationCall | None = None
    generating: bool = False  # a model replica took it: it is no longer in the queue order
    cancelled: bool = False  # the client cancelled it
    stale: bool = False  # the claim is no longer this run's: it writes nothing more
    logs: list[LogEntry] = field(default_factory=list)
    logs_ready: asyncio.Event = field(default_factory=asyncio.Event)
    logs_writing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one batch at a time, in order
    written_logs: list[LogEntry] = field(default_factory=list)  # this run's, as stored: to put a lost job back
    preview: str | None = None  # the latest preview not yet written for viewers (older ones are dropped)
    preview_writer: asyncio.Task | None = field(default=None, repr=False)
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def request_id(self) -> str:
        return self.claim.record.request_id

    def stop(self) -> None:
        if self.call is not None:
            self.call.cancel()


@dataclass
class _Outcome:
    final: FinalEvent | None = None
    error: ServiceError | None = None
    replica_died: bool = False


class JobDispatcher:
    def __init__(
        self,
        store: JobStore,
        generation: GenerationClient,
        config: QueueConfig,
        app_id: str,
        metrics: QueueMetrics | None = None,
        webhooks: WebhookSender | None = None,
        shared_signing_key: str | None = None,
        outputs: OutputStore | None = None,
    ) -> None:
        """`shared_signing_key`: the webhook key kept in the store, which this replica puts back there if
        the store lost it (so that replicas started later sign with the same key). `outputs`: where result
        images go (in memory by default, for tests)."""
        self._store = store
        self._outputs = outputs or OutputStore.in_memory(config)
        self._outputs_swept_at = 0.0
        self._generation = generation
        self._config = config
        self._app_id = app_id
        self._metrics = metrics or QueueMetrics()
        self._webhooks = webhooks or WebhookSender(config.webhook_timeout_s)
        self._shared_signing_key = shared_signing_key
        self._runs: dict[str, _Run] = {}  # in dispatch order
        self._wake = asyncio.Event()  # something to dispatch (a submit, a run ended)
        self._feed_changed = asyncio.Event()
        self._preview_written = asyncio.Event()  # replaced after each set, as _feed_changed
        self._feed_version: tuple[str, int] = ("", 0)
        self._dispatching = asyncio.Lock()
        self._healthy_since: float | None = None  # monotonic: since when every store call was answered
        self._outage_logged = False
        self._claiming = True
        self._closed = False  # loops check it too: a Redis client can swallow a cancel that lands mid-command
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Dispatch, deliver webhooks, sweep expired jobs and follow the store's feed, until `close`."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._forever(self._dispatch_once, DISPATCH_POLL_S, self._wake)),
            loop.create_task(self._forever(self._deliver_webhooks, WEBHOOK_POLL_S)),
            loop.create_task(self._forever(self._sweep, SWEEP_EVERY_S)),
            loop.create_task(self._forever(self._watch_feed, VERSION_POLL_S)),
        ]

    async def close(self, handoff_wait_s: float = 0.0) -> None:
        """Stop. With `handoff_wait_s`, this replica is shutting down: it claims nothing more, hands the
        jobs no model replica has taken yet back to the queue at once, gives running jobs that long to
        finish, then hands those back too. Without it (a crash, a test), leases lapse as they would."""
        self._claiming = False
        async with self._dispatching:  # a claim under way lands before the hand-back, not after it
            pass
        if handoff_wait_s > 0:
            await self._hand_back([run for run in self._runs.values() if not run.generating])
            running = [run.task for run in self._runs.values() if run.task is not None]
            if running:
                await asyncio.wait(running, timeout=handoff_wait_s)
            await self._hand_back(list(self._runs.values()))
        self._closed = True
        tasks = [*self._tasks, *(run.task for run in self._runs.values() if run.task), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the queue API -----------------------------------------------------------------------

    async def submit(
        self,
        request: ResolvedRequest,
        webhook_url: str | None,
        owner: str,
        priority: int = 0,
        start_timeout_s: float | None = None,
        base_url: str | None = None,
        keep_files: KeepFor = "default",
    ) -> Submitted:
        """Queue a job. Raises `QueueFull`/`Overloaded` (503) when the queue or the store is full, and
        `QueueUnavailable` (503) when the store does not answer within `store_wait_s`: never for a job
        that was stored (a submit the store took is retried with its id, which answers the same)."""
        inputs = {name: data for name in INPUT_NAMES if (data := getattr(request, name)) is not None}
        record = JobRecord(
            app_id=self._app_id,
            owner=owner,
            request=request.model_dump(exclude=set(INPUT_NAMES)),
            input_keys=await self._store_inputs(inputs),
            webhook_url=webhook_url,
            priority=priority,
            logs=[LogEntry.now("Queued")],
            base_url=base_url,
            keep_files_s=self._outputs.keep_for(keep_files),
        )
        if start_timeout_s is not None:
            record.deadline = record.submitted_at + start_timeout_s
        deadline = time.monotonic() + self._config.store_wait_s
        accept_until = time.time() + self._config.store_wait_s  # a submit landing later is refused by the store
        try:
            position = await self._store_call(
                lambda: self._store.submit(record, self._config.max_queued, priority, accept_until),
                until=deadline,
                wait_out_full=False,
            )
        except (StoreUnavailable, SubmitRefused) as error:
            self._spawn(self._withdraw(record.request_id))  # if the store took it after all, it never runs
            self._spawn(self._drop_inputs(record.input_keys))
            raise QueueUnavailable(retry_after_s=self._config.store_wait_s) from error
        except StoreFull as error:
            self._spawn(self._drop_inputs(record.input_keys))  # a refused submit leaves nothing behind
            raise Overloaded("the job store is full; retry later", retry_after_s=5) from error
        except ServiceError:  # the queue is full, the owner's caps reached
            self._spawn(self._drop_inputs(record.input_keys))
            raise
        self._poke_feed()
        self._wake.set()
        return Submitted(snapshot=JobSnapshot.of(record), position=position)

    async def _store_inputs(self, inputs: dict[str, bytes]) -> dict[str, str]:
        """Input images to the object store (Redis keeps only their keys); their keys by name."""
        if not inputs:
            return {}
        token = self._outputs.new_token(INPUTS_KEEP_S)
        keys = {name: f"{token}/{index}.bin" for index, name in enumerate(inputs)}
        try:
            for name, data in inputs.items():
                await self._outputs.put_at(keys[name], data, "application/octet-stream")
        except Exception as error:  # noqa: BLE001 - the object store's errors vary by backend
            logger.warning("Storing a submit's input images failed: %r", error)
            raise QueueUnavailable(retry_after_s=5) from error
        return keys

    async def _drop_inputs(self, keys: dict[str, str]) -> None:
        """Delete a job's input images once nothing will run it (else they expire with `INPUTS_KEEP_S`)."""
        if not keys:
            return
        try:
            await self._outputs.delete(list(keys.values()))
        except Exception as error:  # noqa: BLE001 - best effort: the sweep removes them on expiry
            logger.warning("Deleting input images %s failed: %r", list(keys.values()), error)

    async def _with_inputs(self, request: ResolvedRequest, keys: dict[str, str]) -> ResolvedRequest:
        """The request with its input images read back from the object store (tried again while it fails)."""
        images: dict[str, bytes] = {}
        for name, key in keys.items():
            for attempt in range(INPUT_READ_TRIES):
                try:
                    found = await self._outputs.get(key)
                    break
                except Exception as error:  # noqa: BLE001 - the store's own errors vary by backend
                    logger.warning("Reading input %s failed (%r); attempt %d", key, error, attempt + 1)
                    await asyncio.sleep(1.0)
            else:
                found = None
            if found is None:
                raise GenerationFailed("the job's input images could not be read back (expired, or the store failed)")
            images[name] = found[0]
        return request.model_copy(update=images)

    async def changes(self, epoch: str, since: int, queue_since: int, timeout_s: float) -> FeedChanges:
        """The feed the ingress replicas follow (a long poll): the store's changes since `since`, as soon
        as there are any; an answer without changes after `timeout_s` (or while the store is away)."""
        deadline = time.monotonic() + timeout_s
        unchanged = FeedChanges(
            epoch=epoch, version=since, queue_version=queue_since, reset=False, jobs=[], queued=None
        )
        try:
            while await self._store.version() == (epoch, since):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return unchanged
                await wait_event(self._feed_changed, remaining)  # woken by the feed watcher, or this replica's writes
            return await self._store.changes(epoch, since, queue_since)
        except StoreUnavailable:
            await asyncio.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
            return unchanged

    async def snapshot(self, request_id: str) -> JobSnapshot | None:
        """A job a mirror does not know (yet), from the store."""
        return await self._read(lambda: self._store.snapshot(request_id))

    async def audit(self, held: list[JobSnapshot]) -> list[JobSnapshot]:
        """Unfinished jobs a mirror holds that it has heard nothing of for a while: the store's word on
        each. Those the store no longer has were lost while accepted: they complete with `job_lost`."""
        found = await self._read(lambda: self._store.exists([snapshot.request_id for snapshot in held]))
        # A job this replica runs is put back by its run (`_put_back`), never taken for lost.
        lost = [s for s, exists in zip(held, found, strict=True) if not exists and s.request_id not in self._runs]
        if lost:
            jobs = [(snapshot.request_id, snapshot.owner, snapshot.webhook_url) for snapshot in lost]
            written = await self._read(lambda: self._store.mark_lost(jobs, JobLost().body()))
            for request_id in written:
                logger.warning("Job %s was accepted, then lost by the job store: completed as job_lost", request_id)
                self._metrics.job_finished("failed", JobLost.error_type)
            self._poke_feed()
        snapshots = []
        for snapshot in held:
            found = await self._read(lambda request_id=snapshot.request_id: self._store.snapshot(request_id))
            if found is None and (run := self._runs.get(snapshot.request_id)) is not None:
                found = JobSnapshot.of(run.claim.record)  # running here, not put back yet: not unknown
            if found is not None:
                snapshots.append(found)
        return snapshots

    async def result(self, request_id: str) -> JobRecord | None:
        """The record of a job (with its result or error); None when unknown or evicted. A `sync_mode`
        job's images come inline, as data URIs, read back from the object store."""
        record = await self._read(lambda: self._store.get(request_id))
        if record is None or not record.result or not (record.request or {}).get("sync_mode"):
            return record
        images = []
        for image in record.result.get("images", []):
            found = await self.file(image["url"].removeprefix("/files/"))
            if found is None:  # expired: the URL answers 404, as a URL of any other job's would
                images.append(image)
                continue
            data, content_type = found
            images.append({**image, "url": f"data:{content_type};base64,{base64.b64encode(data).decode()}"})
        return record.model_copy(update={"result": {**record.result, "images": images}})

    async def file(self, key: str) -> tuple[bytes, str] | None:
        try:
            return await self._outputs.get(key)
        except Exception as error:  # noqa: BLE001 - the object store away: 503, never its exception text
            logger.warning("Reading %s from the object store failed: %r", key, error)
            raise QueueUnavailable(retry_after_s=self._config.store_wait_s) from error

    async def cancel(self, request_id: str, owner: str | None) -> CancelOutcome:
        """fal's cancel: "removed" (was queued), "requested" (running: stops at the next step),
        "completed" or "unknown" (also for another owner's job)."""
        outcome = await self._read(lambda: self._store.cancel(request_id, owner))
        if outcome == "removed":
            self._metrics.job_finished("cancelled", Cancelled.error_type)
        elif outcome == "requested" and (run := self._runs.get(request_id)) is not None:
            run.cancelled = True  # else another replica runs it: it sees the request on its next renewal
            run.stop()
        self._poke_feed()
        return outcome

    def stats(self) -> dict:
        return {"dispatched": len(self._runs), "claiming": self._claiming}

    def jwks(self) -> dict:
        """The public key webhooks are signed with, as a JWKS (an empty set when they are not signed)."""
        signer = self._webhooks.signer
        return signer.jwks() if signer is not None else {"keys": []}

    # --- the store, waited for --------------------------------------------------------------

    async def _store_call(
        self, call: Callable[[], Awaitable[T]], until: float | None = None, wait_out_full: bool = True
    ) -> T:
        """`call` until the store answers: while it does not, wait and try again (backoff), for ever or
        until `until` (monotonic; then `StoreUnavailable`). A store refusing writes for memory is waited
        out the same way (its caps and sweeps free it), unless `wait_out_full` is off (a submit: 503)."""
        delay = STORE_BACKOFF_S[0]
        while True:
            if self._closed:  # stopping: a cancel a Redis client swallowed mid-command must not be lost
                raise asyncio.CancelledError
            try:
                answer = await call()
            except StoreFull as error:
                if not wait_out_full:
                    raise
                logger.warning("The job store refuses writes for memory (%s); waiting", error)
                if until is not None and time.monotonic() + delay > until:
                    raise StoreUnavailable(str(error)) from error
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_BACKOFF_S[1])
                continue
            except StoreUnavailable as error:
                self._unanswered(error)
                if until is not None and time.monotonic() + delay > until:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_BACKOFF_S[1])
                continue
            self._answered()
            return answer

    def _answered(self) -> None:
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()
            if self._outage_logged:
                logger.warning("The job store answers again")
                self._outage_logged = False

    def _unanswered(self, error: StoreUnavailable) -> None:
        """Outages are logged once, with their end."""
        self._healthy_since = None
        if not self._outage_logged:
            logger.warning("The job store does not answer (%s); waiting for it", error)
            self._outage_logged = True

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T:
        """A call a client waits for: the store gets `store_wait_s`, then the client gets 503."""
        try:
            return await self._store_call(call, until=time.monotonic() + self._config.store_wait_s)
        except StoreUnavailable as error:
            raise QueueUnavailable(retry_after_s=self._config.store_wait_s) from error

    def _may_requeue_lapsed_leases(self) -> bool:
        """Only after the store has answered this replica for a whole lease: an owner cut off by an
        outage has had its chance to renew."""
        healthy = self._healthy_since
        return healthy is not None and time.monotonic() - healthy >= self._config.lease_s

    # --- dispatching --------------------------------------------------------------------------

    async def _forever(self, step: Callable[[], Awaitable[None]], period_s: float, wake: asyncio.Event | None = None):
        while not self._closed:
            try:
                await step()
                self._answered()  # every loop's step asks the store: this is how an outage's end is seen
            except StoreUnavailable as error:
                self._unanswered(error)
            except Exception:  # noqa: BLE001 - a loop of the job queue must outlive any one failure
                logger.exception("The job queue's %s failed; retrying", step.__name__)
            if wake is None:
                await asyncio.sleep(period_s)
                continue
            wake.clear()
            await wait_event(wake, period_s)

    async def _dispatch_once(self) -> None:
        """Requeue the jobs of dead owners, claim what the model replicas can take."""
        async with self._dispatching:
            if self._may_requeue_lapsed_leases():
                for request_id in await self._store.reclaim_expired(self._config.max_attempts):
                    logger.warning("Job %s lost its job-queue replica: requeued or failed", request_id)
                    self._poke_feed()
            if await self._store.expire_unstarted():
                self._poke_feed()
            waiting = await self._store.waiting()
            self._metrics.queue_depth(waiting + sum(not run.generating for run in self._runs.values()))
            if not self._claiming or not waiting:
                return
            capacity = max(1, await self._generation.ready_replicas())  # only with a backlog: it may ask Serve
            while self._claiming and len(self._runs) < capacity + DISPATCH_AHEAD:
                claim = await self._store_call(lambda: self._store.claim(self._config.lease_s))
                if claim is None:
                    break
                self._poke_feed()
                run = _Run(claim)
                self._runs[run.request_id] = run
                run.task = asyncio.get_running_loop().create_task(self._run(run))

    async def _run(self, run: _Run) -> None:
        loop = asyncio.get_running_loop()
        helpers = [loop.create_task(self._keep_lease(run)), loop.create_task(self._write_logs(run))]
        if run.claim.record.deadline is not None:
            helpers.append(loop.create_task(self._start_by_deadline(run, run.claim.record.deadline)))
        try:
            outcome = await self._generate(run)
            await self._conclude(run, outcome)
        except asyncio.CancelledError:
            run.stop()  # this replica stops: so does the generation; the lease lapses
            raise
        except Exception:  # noqa: BLE001 - a bug here must not leave the job to its lease alone
            logger.exception("Job %s failed in the job queue", run.request_id)
            await self._conclude(run, _Outcome(error=as_service_error(Exception())))
        finally:
            for helper in helpers:
                helper.cancel()
            if self._runs.get(run.request_id) is run:  # not a newer run of the same job
                del self._runs[run.request_id]
            self._wake.set()

    async def _generate(self, run: _Run) -> _Outcome:
        """The job on a model replica: its final event, or why not."""
        try:
            request = ResolvedRequest.model_validate(run.claim.record.request)
        except ValueError:
            logger.exception("Job %s has a request this version cannot run", run.request_id)
            return _Outcome(error=as_service_error(ValueError()))
        try:
            request = await self._with_inputs(request, run.claim.record.input_keys)
        except GenerationFailed as error:
            return _Outcome(error=error)

        async def on_preview(event: PreviewEvent) -> None:
            self._show_preview(run, event)

        async def on_progress(event: ProgressEvent) -> None:
            if not run.generating:
                run.generating = True
                self._metrics.waited(max(0.0, time.time() - run.claim.record.submitted_at))
                self._log(run, "Started")
            self._log(run, f"step {event.step + 1}/{event.num_inference_steps}")

        while True:
            if run.cancelled or run.stale:
                return _Outcome(error=Cancelled("the job was cancelled"))
            run.call = self._generation.events(request, WATCHED_QUEUE_JOB if self._config.previews else QUEUE_JOB)
            try:
                return _Outcome(final=await run.call.result(on_progress=on_progress, on_preview=on_preview))
            except Overloaded:
                await asyncio.sleep(OVERLOAD_RETRY_S)  # every model queue is full of streams: wait, still queued
            except ServiceError as error:
                if run.cancelled:
                    return _Outcome(error=Cancelled("the job was cancelled while running"))
                return _Outcome(error=error, replica_died=error.retryable)

    async def _start_by_deadline(self, run: _Run, deadline: float) -> None:
        """A job not taken by a model replica by its start deadline stops waiting; the store completes it
        504 `start_timeout` (`expire_unstarted`), and it never runs."""
        await asyncio.sleep(max(0.0, deadline - time.time()))
        if not run.generating:
            logger.info("Job %s did not start within its X-Fal-Request-Timeout", run.request_id)
            run.stale = True
            run.stop()
            self._wake.set()

    def _show_preview(self, run: _Run, event: PreviewEvent) -> None:
        """Kept in the store for the job's viewers, behind the run: one write at a time, and a preview that
        arrives while one is written replaces any still waiting (a viewer wants the latest, and the
        generation never waits for the store)."""
        run.preview = event.model_dump_json()
        if run.preview_writer is None or run.preview_writer.done():
            run.preview_writer = asyncio.get_running_loop().create_task(self._write_previews(run))

    async def _write_previews(self, run: _Run) -> None:
        while run.preview is not None and not run.stale and not self._closed:
            event_json, run.preview = run.preview, None
            try:
                await self._store.put_preview(run.request_id, run.claim.token, event_json)
            except StoreUnavailable:
                return  # previews are for watching: one lost to an outage is not retried
            self._preview_written.set()
            self._preview_written = asyncio.Event()

    async def previews(self, request_id: str, after: str, timeout_s: float) -> list[tuple[str, str]]:
        """A running job's previews after `after` (an entry id, "" for all kept), as soon as there are any
        (a long poll): [(id, PreviewEvent JSON)], [] after `timeout_s` without one."""
        deadline = time.monotonic() + timeout_s
        while True:
            entries = await self._read(lambda: self._store.previews_after(request_id, after))
            remaining = deadline - time.monotonic()
            if entries or remaining <= 0:
                return entries
            # Written here: woken at once; written by another replica: seen within a poll.
            await wait_event(self._preview_written, min(PREVIEW_POLL_S, remaining))

    def _log(self, run: _Run, message: str) -> None:
        """Written behind the run (`_write_logs`): the store being away never holds a generation up."""
        run.logs.append(LogEntry.now(message))
        run.logs_ready.set()

    async def _write_logs(self, run: _Run) -> None:
        while not self._closed:
            await run.logs_ready.wait()
            await self._flush_logs(run)

    async def _flush_logs(self, run: _Run) -> None:
        """Write the logs waiting, after any batch still being written (through an outage, for as long as
        it lasts): every line, in order."""
        async with run.logs_writing:
            run.logs_ready.clear()
            batch, run.logs = run.logs, []
            if not batch or run.stale:
                return
            request_id, token = run.request_id, run.claim.token
            for _ in range(2):  # a second time after putting back a job the store lost
                if batch[0].message == "Started":
                    written = await self._store_call(lambda: self._store.start(request_id, token, batch))
                else:
                    written = await self._store_call(lambda: self._store.append_logs(request_id, token, batch))
                if written != "missing":
                    break
                await self._put_back(run)
            run.written_logs.extend(batch)
        self._poke_feed()
        if written == "stale":
            self._lost_claim(run)

    async def _keep_lease(self, run: _Run) -> None:
        """Renew the lease until the run ends (through outages: the run goes on meanwhile). A claim now
        someone else's stops the run at once; so does a cancel asked through another replica."""
        while not self._closed:
            await asyncio.sleep(self._config.lease_s / 3)
            renewed = await self._store_call(
                lambda: self._store.renew(run.request_id, run.claim.token, self._config.lease_s)
            )
            if renewed == "lost":
                self._lost_claim(run)
                return
            if renewed == "missing":  # the store lost the job (a flush, a restart without its data)
                await self._put_back(run)
            if renewed == "cancel" and not run.cancelled:
                run.cancelled = True
                run.stop()

    async def _put_back(self, run: _Run) -> None:
        """The store lost a job this replica is running: the run holds its record and logs, so it puts the
        job back and finishes it (before a mirror's audit would complete it as lost)."""
        logs = [*run.claim.record.logs, *run.written_logs, LogEntry.now("The job store lost this job; restored")]
        restored = await self._store_call(
            lambda: self._store.readopt(run.claim.record, run.claim.token, self._config.lease_s, logs)
        )
        logger.warning("Job %s: the store lost it while it ran; put back: %s", run.request_id, restored)
        self._poke_feed()

    def _lost_claim(self, run: _Run) -> None:
        if not run.stale:
            logger.warning(
                "Job %s: attempt %s lost its claim to another run; stopping it", run.request_id, run.claim.token
            )
        run.stale = True
        run.stop()

    async def _conclude(self, run: _Run, outcome: _Outcome) -> None:
        """Write how the run ended, waiting for the store as long as it takes (the result is kept meanwhile);
        nothing at all if the claim went to another run."""
        request_id, token = run.request_id, run.claim.token
        await self._flush_logs(run)
        if run.stale:
            return
        if outcome.replica_died:
            requeued = await self._store_call(lambda: self._store.requeue(request_id, token, self._config.max_attempts))
            logger.warning("Job %s: its model replica failed (attempt %s): %s", request_id, token, requeued)
            if requeued == "failed":
                self._metrics.job_finished("failed", outcome.error.error_type)
            self._poke_feed()
            return
        result = None
        if outcome.final is not None:
            result = await self._stored_result(run, outcome.final)
            if result is None:
                return  # the claim went stale while storing files
            self._log(run, "Completed")  # once its images are stored: right before the job completes
            await self._flush_logs(run)
            if run.stale:
                return
        error = outcome.error.body() if outcome.error is not None and outcome.final is None else None
        inference_time = outcome.final.timings.inference if outcome.final is not None else None
        finished = await self._store_call(
            lambda: self._store.finish(request_id, token, result=result, error=error, inference_time=inference_time)
        )
        if finished == "missing":  # the store lost the job while it ran: the run's result (files in the
            record = run.claim.record.model_copy(  # object store) is still its
                update={
                    "state": "COMPLETED",
                    "result": result,
                    "error": error,
                    "inference_time": inference_time,
                    "logs": [*run.claim.record.logs, *run.written_logs],
                }
            )
            await self._store_call(lambda: self._store.restore(record))
            finished = "completed"
        if finished == "completed":
            self._spawn(self._drop_inputs(run.claim.record.input_keys))  # never run again: its inputs can go
            error_type = error.error_type if error else ""
            self._metrics.job_finished(
                "completed" if error is None else "cancelled" if error_type == "cancelled" else "failed", error_type
            )
        self._poke_feed()

    async def _stored_result(self, run: _Run, final: FinalEvent) -> dict | None:
        """fal's result, its images in the object store: their URLs are `/files/<token>/<i>.<ext>` (a URL
        reveals nothing but the file) or presigned URLs of the store; a `sync_mode` job's come back
        inline when its result is read. An object store that fails is retried (the run's result is held
        meanwhile, its lease renewed) until it answers or this replica stops; None if the claim went to
        another run meanwhile (the files it stored expire unreferenced)."""
        result = final.result()
        images = [(base64.b64decode(image.url.split(",", 1)[1]), image.content_type) for image in result.images]
        sync_mode = bool(run.claim.record.request.get("sync_mode"))
        delay = STORE_BACKOFF_S[0]
        while True:
            if self._closed:
                raise asyncio.CancelledError
            if run.stale:
                return None
            try:
                urls = await self._outputs.put(run.claim.record.keep_files_s, images, presign=not sync_mode)
                break
            except Exception as error:  # noqa: BLE001 - whatever the object store raises, wait it out
                logger.warning("Job %s: storing its images failed (%r); retrying", run.request_id, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_BACKOFF_S[1])
        for image, url in zip(result.images, urls, strict=True):
            image.url = url
        return result.model_dump()

    async def _hand_back(self, runs: list[_Run]) -> None:
        """Give jobs back to the queue front now, not after their leases lapse (this replica stops)."""
        for run in runs:
            run.stale = True
            run.stop()
            try:
                await self._store.release(run.request_id, run.claim.token, ran=run.generating)
            except Exception:  # noqa: BLE001 - the store away, or worse: its lease lapses instead
                logger.warning("Job %s could not be handed back; its lease will lapse", run.request_id)
        self._poke_feed()

    async def _withdraw(self, request_id: str) -> None:
        """A submit answered 503 because the store did not answer: if it took the job after all, remove it,
        and refuse the submit if it arrives late (a job must never run for a client told it was refused)."""
        await self._store_call(lambda: self._store.withdraw(request_id))

    # --- the feed, sweeps and webhooks -------------------------------------------------------

    async def _watch_feed(self) -> None:
        """Wake the long polls when the store's version moves (this replica's writes, or another's)."""
        version = await self._store.version()
        if version != self._feed_version:
            self._feed_version = version
            self._poke_feed()

    def _poke_feed(self) -> None:
        self._feed_changed.set()
        self._feed_changed = asyncio.Event()  # waiters hold the old one, already set

    async def _sweep(self) -> None:
        await self._store.sweep()
        if time.monotonic() - self._outputs_swept_at >= OUTPUTS_SWEEP_EVERY_S:
            self._outputs_swept_at = time.monotonic()
            try:
                deleted = await self._outputs.sweep()
                if deleted:
                    logger.info("Deleted %d expired result files", deleted)
            except Exception as error:  # noqa: BLE001 - the object store away: the next sweep deletes them
                logger.warning("Sweeping expired result files failed: %r", error)
        if self._shared_signing_key is not None:
            await self._store.shared_signing_key(self._shared_signing_key)
        for reason, count in (await self._store.take_evictions()).items():
            self._metrics.evicted(reason, count)

    async def _deliver_webhooks(self) -> None:
        """Deliveries due, from the store's outbox, each leased to this replica while it tries once."""
        lease_s = self._config.webhook_timeout_s * 2 + 5
        for delivery in await self._store.due_webhooks(lease_s):
            self._spawn(self._deliver(delivery))

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        body = delivery.body
        if not body:  # the first attempt: the body every attempt sends, made from the record once
            record = await self._store_call(lambda: self._store.get(delivery.request_id)) or delivery.kept
            if record is None:
                logger.warning("Webhook for %s: the job is gone before its first attempt", delivery.request_id)
                await self._store_call(lambda: self._store.settle_webhook(delivery.request_id, None))
                return
            made = webhook_payload(record).model_dump_json()
            body = await self._store_call(lambda: self._store.keep_webhook_body(delivery.request_id, made))
        sent = await self._webhooks.send(delivery.url, delivery.request_id, delivery.owner, body)
        retry_in = None
        if sent == "retry" and delivery.attempt < self._config.webhook_attempts:
            retry_in = self._config.webhook_retry_base_s * 2 ** (delivery.attempt - 1)
        elif sent == "retry":
            logger.warning("Webhook for %s: given up after %d attempts", delivery.request_id, delivery.attempt)
        self._metrics.webhook("retrying" if retry_in is not None else "given_up" if sent == "retry" else sent)
        await self._store_call(lambda: self._store.settle_webhook(delivery.request_id, retry_in))

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._background.discard)
