"""The Redis job store: jobs survive the job-queue replica being killed or redeployed.

Key layout under `prefix` (e.g. `sdxl:my-app:`):
  queue         sorted set id -> score: the submit sequence; a re-queued job scores `seq - 2**50`,
                so it is ahead of every fresh job and in submit order among re-queued ones
  seq           counter (INCR) behind those scores
  running       sorted set id -> lease expiry, milliseconds of the Redis server's clock (TIME)
  owners        hash id -> owner of the lease
  job:{id}      hash of the record's fields (JSON for dicts); absent field = None
  logs:{id}     list of JSON log objects, so a denoising step's log is one RPUSH, not a rewrite
  file:{key}    hash {data, content_type}
Completed jobs' `job:`/`logs:` keys and files get a TTL of `result_ttl_s`; queued and running ones none.

Every state change is one Lua script, hence atomic. Leases use the server's clock only, so
dispatchers with skewed clocks agree on expiry; record timestamps are the caller's `time.time()`.
Scripts derive per-job keys from the prefix: one Redis node, not Redis Cluster.
"""

from __future__ import annotations

import json
import time

from redis.asyncio import Redis

from serve_app.contract.errors import ErrorBody
from serve_app.contract.queue import LogEntry
from serve_app.queue.records import (
    CancelOutcome,
    JobRecord,
    cancelled_error,
    cancelled_while_orphaned_error,
    replica_failed_error,
)
from serve_app.queue.store import DEFAULT_RESULT_TTL_S, DEFAULT_RETRY_AFTER_S, JobStore, QueueFull

# Shared by the scripts below; ARGV[1] of every script is the key prefix.
_PRELUDE = """
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function complete(id, finished_at, ttl_ms, fields)
  redis.call('ZREM', P .. 'queue', id)
  redis.call('ZREM', P .. 'running', id)
  redis.call('HDEL', P .. 'owners', id)
  local job = P .. 'job:' .. id
  redis.call('HSET', job, 'state', 'COMPLETED', 'finished_at', finished_at, unpack(fields))
  redis.call('PEXPIRE', job, ttl_ms)
  redis.call('PEXPIRE', P .. 'logs:' .. id, ttl_ms)
end
"""

# ARGV: prefix, id, max_queued, n (hash args), hash field/value pairs..., log entries...
_SUBMIT = """
local id = ARGV[2]
if redis.call('EXISTS', P .. 'job:' .. id) == 1 then return -2 end
if redis.call('ZCARD', P .. 'queue') >= tonumber(ARGV[3]) then return -1 end
local seq = redis.call('INCR', P .. 'seq')
local n = tonumber(ARGV[4])
redis.call('HSET', P .. 'job:' .. id, 'seq', seq, unpack(ARGV, 5, 4 + n))
if #ARGV > 4 + n then redis.call('RPUSH', P .. 'logs:' .. id, unpack(ARGV, 5 + n)) end
redis.call('ZADD', P .. 'queue', seq, id)
return redis.call('ZRANK', P .. 'queue', id)
"""

# ARGV: prefix, owner, lease_ms, started_at -> false | {id, HGETALL, LRANGE}
_CLAIM = """
local head = redis.call('ZRANGE', P .. 'queue', 0, 0)
if #head == 0 then return false end
local id = head[1]
redis.call('ZREM', P .. 'queue', id)
local job = P .. 'job:' .. id
redis.call('HSET', job, 'state', 'IN_PROGRESS', 'started_at', ARGV[4])
redis.call('HINCRBY', job, 'attempts', 1)
redis.call('ZADD', P .. 'running', now_ms() + tonumber(ARGV[3]), id)
redis.call('HSET', P .. 'owners', id, ARGV[2])
return {id, redis.call('HGETALL', job), redis.call('LRANGE', P .. 'logs:' .. id, 0, -1)}
"""

# ARGV: prefix, id, owner, lease_ms
_RENEW = """
if redis.call('HGET', P .. 'owners', ARGV[2]) ~= ARGV[3] then return 0 end
redis.call('ZADD', P .. 'running', 'XX', now_ms() + tonumber(ARGV[4]), ARGV[2])
return 1
"""

# ARGV: prefix, id, log entries...
_APPEND_LOGS = """
local state = redis.call('HGET', P .. 'job:' .. ARGV[2], 'state')
if not state or state == 'COMPLETED' then return 0 end
redis.call('RPUSH', P .. 'logs:' .. ARGV[2], unpack(ARGV, 3))
return 1
"""

# ARGV: prefix, id, owner ('' = any), finished_at, ttl_ms, field/value pairs...
_FINISH = """
local id = ARGV[2]
local state = redis.call('HGET', P .. 'job:' .. id, 'state')
if not state or state == 'COMPLETED' then return 0 end
if ARGV[3] ~= '' and redis.call('HGET', P .. 'owners', id) ~= ARGV[3] then return 0 end
complete(id, ARGV[4], ARGV[5], {unpack(ARGV, 6)})
return 1
"""

# ARGV: prefix, id, finished_at, ttl_ms, cancelled error JSON
_CANCEL = """
local id = ARGV[2]
local job = P .. 'job:' .. id
local state = redis.call('HGET', job, 'state')
if not state then return 'unknown' end
if state == 'COMPLETED' then return 'completed' end
if state == 'IN_PROGRESS' then
  redis.call('HSET', job, 'cancel_requested', '1')
  return 'requested'
end
complete(id, ARGV[3], ARGV[4], {'error', ARGV[5]})
return 'removed'
"""

# ARGV: prefix, max_attempts, finished_at, ttl_ms, replica_failed error JSON, cancelled error JSON
_RECLAIM = """
local jobs = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', now_ms())) do
  local f = redis.call('HMGET', P .. 'job:' .. id, 'seq', 'attempts', 'cancel_requested')
  if f[1] then
    table.insert(jobs, {id = id, seq = tonumber(f[1]), attempts = tonumber(f[2]), cancel = f[3]})
  else  -- the record is gone (deleted by hand): forget the lease
    redis.call('ZREM', P .. 'running', id)
    redis.call('HDEL', P .. 'owners', id)
  end
end
table.sort(jobs, function(a, b) return a.seq < b.seq end)
local ids = {}
for _, j in ipairs(jobs) do
  if j.cancel == '1' then
    complete(j.id, ARGV[3], ARGV[4], {'error', ARGV[6]})
  elseif j.attempts >= tonumber(ARGV[2]) then
    complete(j.id, ARGV[3], ARGV[4], {'error', ARGV[5]})
  else
    redis.call('ZREM', P .. 'running', j.id)
    redis.call('HDEL', P .. 'owners', j.id)
    redis.call('HSET', P .. 'job:' .. j.id, 'state', 'IN_QUEUE')
    redis.call('HDEL', P .. 'job:' .. j.id, 'started_at')
    redis.call('ZADD', P .. 'queue', j.seq - 2^50, j.id)
  end
  table.insert(ids, j.id)
end
return ids
"""


def key_prefix(app_id: str) -> str:
    """The default prefix: one app's jobs apart from another's on a shared Redis."""
    return f"sdxl:{app_id}:"


class RedisJobStore(JobStore):
    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = key_prefix("default"),
        result_ttl_s: float = DEFAULT_RESULT_TTL_S,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    ) -> None:
        """`client` must not decode responses (files are bytes); `close` closes it."""
        self._redis = client
        self._prefix = prefix
        self._ttl_ms = _ms(result_ttl_s)
        self._retry_after_s = retry_after_s
        script = client.register_script
        self._submit = script(_PRELUDE + _SUBMIT)
        self._claim = script(_PRELUDE + _CLAIM)
        self._renew = script(_PRELUDE + _RENEW)
        self._append_logs = script(_PRELUDE + _APPEND_LOGS)
        self._finish = script(_PRELUDE + _FINISH)
        self._cancel = script(_PRELUDE + _CANCEL)
        self._reclaim = script(_PRELUDE + _RECLAIM)

    @classmethod
    def from_url(cls, url: str, **kwargs) -> RedisJobStore:
        """`url` as `redis.asyncio.Redis.from_url` takes it (redis://host:port/db); kwargs as `__init__`."""
        return cls(Redis.from_url(url), **kwargs)

    async def submit(self, record: JobRecord, max_queued: int) -> int:
        if record.state != "IN_QUEUE":
            raise ValueError(f"request {record.request_id} is not a fresh record")
        fields = [item for pair in _record_fields(record).items() for item in pair]
        logs = [log.model_dump_json() for log in record.logs]
        args = [self._prefix, record.request_id, max_queued, len(fields), *fields, *logs]
        position = await self._submit(args=args)
        if position == -1:
            raise QueueFull(self._retry_after_s)
        if position == -2:
            raise ValueError(f"request {record.request_id} was already submitted")
        return position

    async def get(self, request_id: str) -> JobRecord | None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key("job:", request_id))
            pipe.lrange(self._key("logs:", request_id), 0, -1)
            fields, logs = await pipe.execute()
        return _record_from(fields, logs) if fields else None

    async def position(self, request_id: str) -> int | None:
        return await self._redis.zrank(self._key("queue"), request_id)

    async def queued_ids(self) -> list[str]:
        return [member.decode() for member in await self._redis.zrange(self._key("queue"), 0, -1)]

    async def claim(self, owner: str, lease_s: float) -> JobRecord | None:
        claimed = await self._claim(args=[self._prefix, owner, _ms(lease_s), repr(time.time())])
        if not claimed:
            return None
        _, flat_fields, logs = claimed
        return _record_from(dict(zip(flat_fields[::2], flat_fields[1::2], strict=True)), logs)

    async def renew(self, request_id: str, owner: str, lease_s: float) -> bool:
        return bool(await self._renew(args=[self._prefix, request_id, owner, _ms(lease_s)]))

    async def append_logs(self, request_id: str, logs: list[LogEntry]) -> None:
        if logs:
            await self._append_logs(args=[self._prefix, request_id, *(log.model_dump_json() for log in logs)])

    async def finish(
        self,
        request_id: str,
        owner: str | None,
        *,
        result: dict | None = None,
        error: ErrorBody | None = None,
        inference_time: float | None = None,
    ) -> bool:
        outcome = {"result": result, "error": error, "inference_time": inference_time}
        fields = [item for pair in _optional_fields(outcome).items() for item in pair]
        args = [self._prefix, request_id, owner or "", repr(time.time()), self._ttl_ms, *fields]
        return bool(await self._finish(args=args))

    async def cancel(self, request_id: str) -> CancelOutcome:
        args = [self._prefix, request_id, repr(time.time()), self._ttl_ms, cancelled_error().model_dump_json()]
        return (await self._cancel(args=args)).decode()

    async def reclaim_expired(self, max_attempts: int) -> list[str]:
        errors = [replica_failed_error(max_attempts), cancelled_while_orphaned_error()]
        args = [self._prefix, max_attempts, repr(time.time()), self._ttl_ms, *(e.model_dump_json() for e in errors)]
        return [request_id.decode() for request_id in await self._reclaim(args=args)]

    async def running_ids(self) -> list[str]:
        return [member.decode() for member in await self._redis.zrange(self._key("running"), 0, -1)]

    async def put_file(self, key: str, data: bytes, content_type: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("file:", key), mapping={"data": data, "content_type": content_type})
            pipe.pexpire(self._key("file:", key), self._ttl_ms)
            await pipe.execute()

    async def get_file(self, key: str) -> tuple[bytes, str] | None:
        data, content_type = await self._redis.hmget(self._key("file:", key), ["data", "content_type"])
        return None if data is None else (data, content_type.decode())

    async def close(self) -> None:
        await self._redis.aclose()

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self._prefix}{kind}{name}"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _optional_fields(values: dict) -> dict[str, str]:
    """Hash fields for the values that are not None: dicts and models as JSON, floats exactly (repr)."""
    fields = {}
    for name, value in values.items():
        if isinstance(value, ErrorBody):
            fields[name] = value.model_dump_json()
        elif isinstance(value, dict):
            fields[name] = json.dumps(value)
        elif value is not None:
            fields[name] = repr(value) if isinstance(value, float) else str(value)
    return fields


def _record_fields(record: JobRecord) -> dict[str, str]:
    """The job hash of a fresh record (logs go to their own list)."""
    return {
        "request_id": record.request_id,
        "app_id": record.app_id,
        "request": json.dumps(record.request),
        "state": record.state,
        "submitted_at": repr(record.submitted_at),
        "attempts": str(record.attempts),
        "cancel_requested": "1" if record.cancel_requested else "0",
        **_optional_fields(
            {
                "started_at": record.started_at,
                "finished_at": record.finished_at,
                "result": record.result,
                "error": record.error,
                "inference_time": record.inference_time,
                "webhook_url": record.webhook_url,
            }
        ),
    }


def _record_from(raw: dict[bytes, bytes], logs: list[bytes]) -> JobRecord:
    fields = {name.decode(): value.decode() for name, value in raw.items()}

    def number(name: str) -> float | None:
        return float(fields[name]) if name in fields else None

    return JobRecord(
        request_id=fields["request_id"],
        app_id=fields["app_id"],
        request=json.loads(fields["request"]),
        state=fields["state"],
        submitted_at=float(fields["submitted_at"]),
        started_at=number("started_at"),
        finished_at=number("finished_at"),
        attempts=int(fields["attempts"]),
        logs=[LogEntry.model_validate_json(log) for log in logs],
        result=json.loads(fields["result"]) if "result" in fields else None,
        error=ErrorBody.model_validate_json(fields["error"]) if "error" in fields else None,
        inference_time=number("inference_time"),
        webhook_url=fields.get("webhook_url"),
        cancel_requested=fields["cancel_requested"] == "1",
    )
