"""The job store: queue, leases, results, the status feed and the webhook outbox of one app's jobs.

One implementation, two backends: Redis (`JobStore.from_url`; jobs survive the job-queue replicas, and
several replicas share it) and an in-process fakeredis (`JobStore.in_memory`, the default; jobs die with
the replica). Every change is one Lua script (`serve_app.queue.scripts`), so it is atomic.

Fencing: a claim's token is the job's attempt number. Starting, logging, renewing and finishing carry
it, and the scripts refuse a stale one, so of two runs of one job (a lease that lapsed while its owner
was cut off) at most one writes its result (a stale run's images stay unreferenced in the object store).

Redis failing is not a job failing: an unanswered call raises `StoreUnavailable` (the caller waits and
tries again) and a write Redis refuses for memory (`maxmemory` with `noeviction`) raises `StoreFull`.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import redis.exceptions
from pydantic import BaseModel
from redis.asyncio import Redis

from serve_app.contract.errors import ErrorBody, Overloaded, StartTimeout
from serve_app.contract.queue import JobState, LogEntry
from serve_app.queue import scripts
from serve_app.queue.records import (
    CancelOutcome,
    JobRecord,
    cancelled_error,
    cancelled_while_orphaned_error,
    replica_failed_error,
)

REDIS_TIMEOUT_S = 1.0  # a paused or unreachable Redis is noticed in this long, not at TCP's pace
FEED_LIMIT = 500  # changes per answer to a mirror; one further behind starts over
PREVIEWS_KEPT = 8  # a running job's latest previews, for viewers (and a reconnecting one to catch up)
PREVIEWS_EXPIRE_S = 600.0  # previews of a run whose replica vanished: gone after this, whatever else


class StoreUnavailable(Exception):
    """Redis did not answer (down, paused, restarting, loading its data): wait, then try again."""


class StoreFull(Exception):
    """Redis refused a write for lack of memory (`maxmemory` with `noeviction`)."""


class SubmitRefused(Exception):
    """A submit that reached Redis after its client was told 503 (or after its withdrawal): not queued."""


class QueueFull(Overloaded):
    """`max_queued` jobs are already waiting: 503 with Retry-After."""

    def __init__(self, retry_after_s: float = 5.0) -> None:
        super().__init__("the job queue is full; retry later", retry_after_s=retry_after_s)


@dataclass(frozen=True)
class StoreLimits:
    """What the store keeps of finished jobs: the oldest are evicted first past any cap (per app, and per
    owner: one client cannot evict everyone's results), and all after `result_ttl_s`."""

    result_ttl_s: float = 3600.0
    max_finished_jobs: int = 10_000
    max_finished_bytes: int = 1024**3
    max_finished_jobs_per_owner: int = 1_000
    max_finished_bytes_per_owner: int = 256 * 1024**2

    def caps(self) -> list[int]:
        return [
            self.max_finished_jobs,
            self.max_finished_bytes,
            self.max_finished_jobs_per_owner,
            self.max_finished_bytes_per_owner,
        ]


@dataclass(frozen=True)
class Claim:
    record: JobRecord
    token: str  # the attempt number the claim made: every write of this run carries it


class JobSnapshot(BaseModel):
    """What a status poll needs to know about one job (its result stays in the store)."""

    request_id: str
    state: JobState
    owner: str = ""
    generating: bool = False  # claimed jobs wait for a model replica until this is true
    logs: list[LogEntry] = []
    inference_time: float | None = None
    error: ErrorBody | None = None
    webhook_url: str | None = None  # so that a job the store loses is still reported where it was asked

    @classmethod
    def of(cls, record: JobRecord) -> JobSnapshot:
        return cls(
            request_id=record.request_id,
            state=record.state,
            owner=record.owner,
            generating=record.generating,
            logs=record.logs,
            inference_time=record.inference_time,
            error=record.error,
            webhook_url=record.webhook_url,
        )


class FeedChanges(BaseModel):
    """One answer to a status mirror: the jobs changed since its version, and the queue order."""

    epoch: str
    version: int
    queue_version: int
    reset: bool  # the mirror must drop what it has: the store started over, or the mirror fell behind
    jobs: list[JobSnapshot]
    queued: list[str] | None  # ids in queue order (what waits for a model replica first), when it changed


@dataclass(frozen=True)
class WebhookDelivery:
    request_id: str
    url: str
    body: str  # '' until the first attempt makes it
    attempt: int
    owner: str  # the job's: fal's X-Fal-Webhook-User-Id
    kept: JobRecord | None = None  # what the body is made of, when the job was evicted before its first attempt


T = TypeVar("T")
Written = Literal["written", "stale", "missing"]  # "stale": the claim is no longer the token's
WRITTEN: dict[int, Written] = {1: "written", 0: "stale", -1: "missing"}


def _translated(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Redis's failures as `StoreUnavailable` or `StoreFull`; a script's own errors (bugs) as they are."""

    @functools.wraps(method)
    async def call(self: JobStore, *args: Any, **kwargs: Any) -> T:
        try:
            return await method(self, *args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            raise StoreUnavailable(str(error)) from error  # BusyLoadingError (replaying its AOF) included
        except redis.exceptions.ResponseError as error:
            message = str(error)
            if isinstance(error, redis.exceptions.OutOfMemoryError) or "maxmemory" in message:
                raise StoreFull(message) from error
            failing_over = (
                redis.exceptions.ReadOnlyError,
                redis.exceptions.MasterDownError,
                redis.exceptions.TryAgainError,
            )
            if isinstance(error, failing_over):  # a replica taking over: it answers again in a moment
                raise StoreUnavailable(message) from error
            raise

    return call


def key_prefix(app_id: str) -> str:
    """The default prefix: one app's jobs apart from another's on a shared Redis."""
    return f"sdxl:{app_id}:"


class JobStore:
    def __init__(self, client: Redis, *, prefix: str = key_prefix("default"), limits: StoreLimits | None = None):
        """`client` must not decode responses (files are bytes); `close` closes it."""
        self._redis = client
        self._prefix = prefix
        self.limits = limits or StoreLimits()
        register = client.register_script
        self._scripts = {
            name: register(scripts.PRELUDE + getattr(scripts, name))
            for name in (
                "SUBMIT", "CLAIM", "START", "LOG", "RENEW", "FINISH", "REQUEUE", "CANCEL", "RECLAIM",
                "LOST", "RESTORE", "SWEEP", "CHANGES", "OUTBOX_DUE", "OUTBOX_SETTLE", "WEBHOOK_BODY", "SNAPSHOT",
                "WITHDRAW", "RELEASE", "TAKE_EVICTIONS", "READOPT", "EXPIRE", "SIGNING_KEY", "PREVIEW",
            )
        }  # fmt: skip

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> JobStore:
        """`url` as redis-py takes it (redis://[:password@]host:port/db); kwargs as `__init__`."""
        client = Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S, health_check_interval=10
        )
        return cls(client, **kwargs)

    @classmethod
    def in_memory(cls, server: Any = None, **kwargs: Any) -> JobStore:
        """In this process (fakeredis, with its Lua): the same scripts, caps and semantics as on Redis.
        Stores given the same `fakeredis.FakeServer` share it, as replicas share a Redis."""
        from fakeredis import FakeAsyncRedis

        return cls(FakeAsyncRedis(server=server), **kwargs)

    async def _run(self, name: str, *args: Any) -> Any:
        """ARGV: the prefix, a fresh epoch (the one a write makes when the store has none: never an old
        one again, so mirrors always notice a store that started over), then `args`."""
        return await self._scripts[name](args=[self._prefix, uuid.uuid4().hex, *args])

    def _finished_args(self) -> list:
        return [repr(time.time()), *self.limits.caps()]

    # --- submitting and reading ----------------------------------------------------------------

    @_translated
    async def submit(
        self, record: JobRecord, max_queued: int, priority: int = 0, accept_until: float | None = None
    ) -> int:
        """Append a fresh record to the queue tail of its priority band (0 normal, 1 low); its 0-based
        position. Submitting the same id again answers the same (a retry whose reply was lost). A submit
        that reaches Redis after `accept_until` (Unix seconds: its client has been told 503 by then), or
        after `withdraw`, is refused (`SubmitRefused`). Raises `QueueFull`."""
        fields = _flat(_record_fields(record))
        logs = [log.model_dump_json() for log in record.logs]
        until = _ms(accept_until if accept_until is not None else time.time() + 3600)
        args = [record.request_id, max_queued, priority, until, len(fields), *fields, *logs]
        position = await self._run("SUBMIT", *args)
        if position == -1:
            raise QueueFull()
        if position == -3:
            raise SubmitRefused(f"request {record.request_id} reached the store too late, or was withdrawn")
        return position

    @_translated
    async def get(self, request_id: str) -> JobRecord | None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key("job:", request_id))
            pipe.lrange(self._key("logs:", request_id), 0, -1)
            fields, logs = await pipe.execute()
        return _record_from(fields, logs) if fields else None

    @_translated
    async def snapshot(self, request_id: str) -> JobSnapshot | None:
        """What a status mirror holds of a job (no request, no result); None when unknown."""
        row = await self._run("SNAPSHOT", request_id)
        return _snapshot_from(row) if row else None

    @_translated
    async def exists(self, request_ids: list[str]) -> list[bool]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.exists(self._key("job:", request_id))
            return [bool(found) for found in await pipe.execute()]

    @_translated
    async def queued_ids(self) -> list[str]:
        """Queued ids, head first: the claimed ones waiting for a replica, then the queue's."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrange(self._key("dispatched"), 0, -1)
            pipe.zrange(self._key("queue"), 0, -1)
            dispatched, queued = await pipe.execute()
        return [member.decode() for member in [*dispatched, *queued]]

    @_translated
    async def waiting(self) -> int:
        """Jobs in the queue (not yet claimed)."""
        return await self._redis.zcard(self._key("queue"))

    @_translated
    async def running_ids(self) -> list[str]:
        """Leased ids, soonest lease expiry first."""
        return [member.decode() for member in await self._redis.zrange(self._key("running"), 0, -1)]

    # --- running a job, fenced by its claim's token ------------------------------------------------

    @_translated
    async def claim(self, lease_s: float) -> Claim | None:
        """Pop the queue head, IN_PROGRESS and leased for `lease_s`; None when the queue is empty."""
        claimed = await self._run("CLAIM", _ms(lease_s), repr(time.time()))
        if not claimed:
            return None
        _, flat, logs, token = claimed
        record = _record_from(dict(zip(flat[::2], flat[1::2], strict=True)), logs)
        return Claim(record=record, token=str(token))

    @_translated
    async def start(self, request_id: str, token: str, logs: list[LogEntry]) -> Written:
        """A model replica took the job: it leaves the queue order."""
        return WRITTEN[await self._run("START", request_id, token, *(log.model_dump_json() for log in logs))]

    @_translated
    async def append_logs(self, request_id: str, token: str, logs: list[LogEntry]) -> Written:
        if not logs:
            return "written"
        return WRITTEN[await self._run("LOG", request_id, token, *(log.model_dump_json() for log in logs))]

    @_translated
    async def renew(self, request_id: str, token: str, lease_s: float) -> Literal["kept", "cancel", "lost", "missing"]:
        """Extend the lease; "cancel" when a cancel was requested (through any replica), "lost" when the
        claim is no longer this token's, "missing" when the store no longer has the job."""
        return ("lost", "kept", "cancel", "missing")[await self._run("RENEW", request_id, token, _ms(lease_s))]

    @_translated
    async def readopt(self, record: JobRecord, token: str, lease_s: float, logs: list[LogEntry]) -> bool:
        """Put back a running job the store lost, as its run knows it (the record it claimed, its logs so
        far), leased to that run. False when the store has the job (then the run's claim decides)."""
        fields = _flat({k: v for k, v in _record_fields(record).items() if k not in ("state", "attempts")})
        entries = [log.model_dump_json() for log in logs]
        return bool(await self._run("READOPT", record.request_id, token, _ms(lease_s), len(fields), *fields, *entries))

    @_translated
    async def put_preview(self, request_id: str, token: str, event_json: str) -> str | None:
        """Keep a running job's preview for its viewers (the last `PREVIEWS_KEPT`); its id, or None when
        the claim is no longer `token`'s."""
        entry = await self._run("PREVIEW", request_id, token, PREVIEWS_KEPT, _ms(PREVIEWS_EXPIRE_S), event_json)
        return entry.decode() or None

    @_translated
    async def previews_after(self, request_id: str, after: str) -> list[tuple[str, str]]:
        """(id, event JSON) of the job's previews kept after `after` ("" for all), oldest first."""
        start = f"({after}" if after else "-"
        entries = await self._redis.xrange(self._key("previews:", request_id), start, "+")
        return [(entry_id.decode(), fields[b"event"].decode()) for entry_id, fields in entries]

    @_translated
    async def finish(
        self,
        request_id: str,
        token: str | None,
        *,
        result: dict | None = None,
        error: ErrorBody | None = None,
        inference_time: float | None = None,
    ) -> Literal["completed", "stale", "missing"]:
        """Complete the job exactly once: "stale" when it completed already or the claim is no longer
        `token`'s (`None`: whoever holds it), "missing" when the store no longer has it."""
        fields = _flat(_optional_fields({"result": result, "error": error, "inference_time": inference_time}))
        outcome = await self._run("FINISH", request_id, token or "", *self._finished_args(), *fields)
        return {1: "completed", 0: "stale", -1: "missing"}[outcome[0]]

    @_translated
    async def restore(self, record: JobRecord) -> bool:
        """Write a completed record the store lost meanwhile (a finished run keeps its result); False when
        the store has the job."""
        fields = _flat({**_record_fields(record), **_optional_fields({"attempts": record.attempts})})
        return bool(await self._run("RESTORE", record.request_id, *self._finished_args(), *fields))

    @_translated
    async def requeue(
        self, request_id: str, token: str, max_attempts: int
    ) -> Literal["requeued", "failed", "cancelled", "stale"]:
        """The model replica running the job died: back to the queue front, unless it has taken down
        `max_attempts` replicas ("failed") or a cancel was asked for ("cancelled")."""
        errors = [replica_failed_error(max_attempts, "model"), cancelled_error()]
        args = [request_id, token, max_attempts, *self._finished_args(), *(e.model_dump_json() for e in errors)]
        return (await self._run("REQUEUE", *args)).decode()

    @_translated
    async def release(self, request_id: str, token: str, ran: bool) -> bool:
        """Hand a claimed job back to the queue front (this replica stops); a claim that never reached a
        model replica does not count as an attempt. False when the claim is stale."""
        return bool(await self._run("RELEASE", request_id, token, "1" if ran else "0"))

    @_translated
    async def withdraw(self, request_id: str, keep_s: float = 3600.0) -> bool:
        """Remove a job whose submit was answered 503, if the store took it, and refuse it for `keep_s`
        if its submit arrives late. True when a queued job was removed."""
        args = [request_id, *self._finished_args(), cancelled_error().model_dump_json(), _ms(keep_s)]
        return bool(await self._run("WITHDRAW", *args))

    @_translated
    async def cancel(self, request_id: str, owner: str | None = None) -> CancelOutcome:
        """Queued: "removed" (completed with the cancelled error, keeping only its status); running:
        "requested" (its runner sees it on renewal); "completed"; "unknown" (also another owner's)."""
        args = [request_id, owner or "", *self._finished_args(), cancelled_error().model_dump_json()]
        return (await self._run("CANCEL", *args)).decode()

    @_translated
    async def reclaim_expired(self, max_attempts: int) -> list[str]:
        """Running jobs whose lease expired go back to the queue front, in submit order among themselves,
        or complete with `replica_failed` once `attempts >= max_attempts` (cancelled if cancel was
        requested). Returns the affected ids in submit order."""
        errors = [replica_failed_error(max_attempts, "job-queue"), cancelled_while_orphaned_error()]
        args = [max_attempts, *self._finished_args(), *(error.model_dump_json() for error in errors)]
        return [request_id.decode() for request_id in await self._run("RECLAIM", *args)]

    @_translated
    async def mark_lost(self, jobs: list[tuple[str, str, str | None]], error: ErrorBody) -> list[str]:
        """Accepted jobs the store no longer has, as (id, owner, webhook URL): each becomes completed with
        `error` (and its webhook is queued). Ids the store has are left alone. Returns the ids written."""
        triples = [value for request_id, owner, url in jobs for value in (request_id, owner, url or "")]
        args = [*self._finished_args(), error.model_dump_json(), *triples]
        return [request_id.decode() for request_id in await self._run("LOST", *args)]

    @_translated
    async def expire_unstarted(self) -> list[str]:
        """Jobs past their start deadline that no model replica took: completed 504 `start_timeout`."""
        args = [*self._finished_args(), StartTimeout().body().model_dump_json()]
        return [request_id.decode() for request_id in await self._run("EXPIRE", *args)]

    @_translated
    async def sweep(self) -> int:
        """Forget finished jobs older than the result TTL (with their logs and files); the number evicted."""
        before = _ms(time.time() - self.limits.result_ttl_s)
        return await self._run("SWEEP", before, *self.limits.caps())

    @_translated
    async def take_evictions(self) -> dict[str, int]:
        """Finished jobs evicted since the last call (by any replica), by reason: `cap` or `expired`."""
        flat = await self._run("TAKE_EVICTIONS")
        return {reason.decode(): int(count) for reason, count in zip(flat[::2], flat[1::2], strict=True)}

    # --- the status feed ------------------------------------------------------------------------

    @_translated
    async def version(self) -> tuple[str, int]:
        """(epoch, version): what a mirror compares to know whether anything changed."""
        epoch, version = await self._redis.mget([self._key("epoch"), self._key("version")])
        return (epoch or b"").decode(), int(version or 0)

    @_translated
    async def changes(self, epoch: str, since: int, queue_since: int) -> FeedChanges:
        """Jobs changed after version `since` of `epoch`, and the queue order if it changed after
        `queue_since`; everything queued or running (`reset`) for a mirror of another epoch or too far
        behind."""
        epoch_now, version, queue_version, reset, jobs, queued = await self._run(
            "CHANGES", epoch, since, queue_since, FEED_LIMIT
        )
        return FeedChanges(
            epoch=epoch_now.decode(),
            version=version,
            queue_version=queue_version,
            reset=bool(reset),
            jobs=[_snapshot_from(row) for row in jobs],
            queued=None if queued is None else [member.decode() for member in queued],
        )

    # --- the webhook outbox -----------------------------------------------------------------------

    @_translated
    async def due_webhooks(self, lease_s: float, limit: int = 20) -> list[WebhookDelivery]:
        """Deliveries due now, each leased to the caller for `lease_s` (another replica takes it after)."""
        due = await self._run("OUTBOX_DUE", _ms(lease_s), limit)
        return [
            WebhookDelivery(
                request_id=row[0].decode(),
                url=row[1].decode(),
                body=row[2].decode(),
                attempt=row[3],
                owner=row[4].decode(),
                kept=_record_from_outcome(row[0], row[5], row[6], row[7]) if row[5] or row[6] else None,
            )
            for row in due
        ]

    @_translated
    async def shared_signing_key(self, candidate: str) -> str:
        """The webhook signing key every replica on this store uses: `candidate`, unless one is kept
        (and `candidate` again after the store lost it: call it now and then)."""
        return (await self._run("SIGNING_KEY", candidate)).decode()

    @_translated
    async def keep_webhook_body(self, request_id: str, body: str) -> str:
        """The body every attempt of this delivery sends: `body`, unless an earlier attempt kept one."""
        await self._run("WEBHOOK_BODY", request_id, body)
        kept = await self._redis.hget(self._key("webhook:", request_id), "body")
        return kept.decode() if kept is not None else body

    @_translated
    async def settle_webhook(self, request_id: str, retry_in_s: float | None) -> None:
        """Delivered or given up (`None`): forget it; else try again in `retry_in_s`."""
        await self._run("OUTBOX_SETTLE", request_id, "" if retry_in_s is None else _ms(retry_in_s))

    async def close(self) -> None:
        await self._redis.aclose()

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self._prefix}{kind}{name}"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _flat(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _optional_fields(values: dict) -> dict[str, str]:
    """Hash fields for the values that are not None: dicts and models as JSON, floats exactly (repr)."""
    fields = {}
    for name, value in values.items():
        if isinstance(value, BaseModel):
            fields[name] = value.model_dump_json()
        elif isinstance(value, dict):
            fields[name] = json.dumps(value)
        elif isinstance(value, bool):
            fields[name] = "1" if value else "0"
        elif value is not None:
            fields[name] = repr(value) if isinstance(value, float) else str(value)
    return fields


def _record_fields(record: JobRecord) -> dict[str, str]:
    """The job hash of a record (logs go to their own list; `attempts` is the store's to count)."""
    return _optional_fields(
        {
            "request_id": record.request_id,
            "app_id": record.app_id,
            "owner": record.owner,
            "request": record.request,
            "state": record.state,
            "priority": record.priority,
            "submitted_at": record.submitted_at,
            "deadline": record.deadline,
            "cancel_requested": record.cancel_requested,
            "started_at": record.started_at,
            "result": record.result,
            "error": record.error,
            "inference_time": record.inference_time,
            "webhook_url": record.webhook_url,
            "base_url": record.base_url,
            "keep_files_s": record.keep_files_s,
            "input_keys": record.input_keys or None,
        }
    )


def _record_from(raw: dict[bytes, bytes], logs: list[bytes]) -> JobRecord:
    fields = {name.decode(): value.decode() for name, value in raw.items()}

    def number(name: str) -> float | None:
        return float(fields[name]) if fields.get(name) else None

    return JobRecord(
        request_id=fields["request_id"],
        app_id=fields.get("app_id", ""),
        owner=fields.get("owner", ""),
        request=json.loads(fields["request"]) if "request" in fields else None,
        state=fields["state"],
        priority=int(fields.get("priority", "0")),
        submitted_at=number("submitted_at") or 0.0,
        deadline=number("deadline"),
        started_at=number("started_at"),
        finished_at=number("finished_at"),
        attempts=int(fields.get("attempts", "0")),
        generating=fields.get("generating") == "1",
        logs=[LogEntry.model_validate_json(log) for log in logs],
        result=json.loads(fields["result"]) if "result" in fields else None,
        error=ErrorBody.model_validate_json(fields["error"]) if "error" in fields else None,
        inference_time=number("inference_time"),
        webhook_url=fields.get("webhook_url"),
        base_url=fields.get("base_url"),
        keep_files_s=number("keep_files_s"),
        cancel_requested=fields.get("cancel_requested") == "1",
        input_keys=json.loads(fields["input_keys"]) if "input_keys" in fields else {},
    )


def _record_from_outcome(request_id: bytes, result: bytes, error: bytes, base_url: bytes) -> JobRecord:
    """What a webhook is made of, as kept when its job was evicted before the first attempt."""
    return JobRecord(
        request_id=request_id.decode(),
        app_id="",
        state="COMPLETED",
        result=json.loads(result) if result else None,
        error=ErrorBody.model_validate_json(error) if error else None,
        base_url=base_url.decode() or None,
    )


def _snapshot_from(row: list) -> JobSnapshot:
    request_id, state, owner, generating, inference_time, error, webhook_url, logs = row
    return JobSnapshot(
        request_id=request_id.decode(),
        state=state.decode(),
        owner=owner.decode(),
        generating=generating == b"1",
        logs=[LogEntry.model_validate_json(log) for log in logs],
        inference_time=float(inference_time) if inference_time else None,
        error=ErrorBody.model_validate_json(error) if error else None,
        webhook_url=webhook_url.decode() or None,
    )
