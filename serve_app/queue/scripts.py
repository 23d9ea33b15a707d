"""The job store's Lua scripts: every change of state is one script, so it is atomic on Redis (and on
the in-process fakeredis the memory store runs on).

Key layout under the prefix `P` (e.g. `sdxl:my-app:`):
  epoch            a random id of this store's life: after a FLUSHDB or a restart without persistence the
                   next write makes a new one, and every status mirror starts over
  version          counter bumped by every change; `changed` (zset id -> version) says which job changed last
  qversion         counter bumped when the queue order changes
  seq              counter behind queue scores and claim order
  queue            zset id -> score: priority band (normal 0, low 1) * 2^52 + seq; a requeued job scores
                   seq - 2^50 in its band, ahead of every fresh job of the band, in submit order among requeued
  dispatched       zset id -> claim order: claimed, waiting for a model replica (still queued for the client)
  running          zset id -> lease expiry, ms of the Redis server's clock (TIME)
  job:{id}         hash of the record's fields; `claims` (it only grows) is the current claim's fencing token,
                   `attempts` what counts against max_attempts (a claim handed back unused does not)
  logs:{id}        list of JSON log entries
  previews:{id}    stream of the running job's latest previews (JSON events, at most PREVIEWS_KEPT): for its
                   viewers; deleted when it completes, and expiring if its runner vanished
  finished         zset id -> finish order (ms * 1000 + a counter); finished:{owner} the same per owner
  bytes            hash: `app` and `owner:{owner}` -> bytes of finished jobs (results, logs; images live in
                   the object store, serve_app.queue.outputs)
  deadlines        zset id -> when it must have started (ms; X-Fal-Request-Timeout), until it starts
  outbox           zset id -> when its webhook is due (ms); webhook:{id} hash {url, owner, body, attempts}
  signing_key      the webhook signing key the replicas share when no Secret gives one (base64 seed)
  evictions        hash reason -> finished jobs evicted since a replica last took the count (for a metric)
  evicted          zset id -> when: the last 100,000 finished jobs evicted (so none is taken for lost)
  withdrawn:{id}   a submit answered 503: if it reaches the store late, it is refused
Queued and running jobs never expire; finished ones are evicted oldest first past the caps, and after
the result TTL by `SWEEP`. Scripts derive per-job keys from the prefix: one Redis node, not Redis Cluster.
"""

# ARGV[1] of every script is the prefix, ARGV[2] an epoch to create if there is none.
PRELUDE = r"""
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function changed(id)
  if redis.call('EXISTS', P .. 'epoch') == 0 then redis.call('SET', P .. 'epoch', ARGV[2]) end
  local version = redis.call('INCR', P .. 'version')
  if id then redis.call('ZADD', P .. 'changed', version, id) end
end
local function queue_changed()
  redis.call('INCR', P .. 'qversion')
  changed(nil)
end
local function holds(id, token)  -- the token is the claim's number: it only ever grows
  local job = redis.call('HMGET', P .. 'job:' .. id, 'state', 'claims')
  return job[1] == 'IN_PROGRESS' and job[2] == token
end
local function position(id)
  local rank = redis.call('ZRANK', P .. 'queue', id)
  if not rank then return 0 end
  return redis.call('ZCARD', P .. 'dispatched') + rank
end
-- What a status mirror holds of a job: {id, state, owner, generating, inference_time, error, webhook_url, logs}
local function snapshot(id)
  local f = redis.call('HMGET', P .. 'job:' .. id, 'state', 'owner', 'generating', 'inference_time', 'error',
                       'webhook_url')
  if not f[1] then return false end
  return {id, f[1], f[2] or '', f[3] or '0', f[4] or '', f[5] or '', f[6] or '',
          redis.call('LRANGE', P .. 'logs:' .. id, 0, -1)}
end
local function delete_job(id)
  local job = P .. 'job:' .. id
  local fields = redis.call('HMGET', job, 'owner', 'bytes')
  local owner, size = fields[1] or '', tonumber(fields[2] or '0')
  local hook = P .. 'webhook:' .. id
  if redis.call('EXISTS', hook) == 1 and redis.call('HEXISTS', hook, 'body') == 0 then
    -- its webhook's first attempt has not made the body yet: keep what it is made from
    local outcome = redis.call('HMGET', job, 'result', 'error', 'base_url')
    if outcome[1] then redis.call('HSET', hook, 'result', outcome[1]) end
    if outcome[2] then redis.call('HSET', hook, 'error', outcome[2]) end
    if outcome[3] then redis.call('HSET', hook, 'base_url', outcome[3]) end
  end
  redis.call('DEL', job, P .. 'logs:' .. id, P .. 'previews:' .. id)
  -- remembered as evicted (not lost): a mirror that missed its completion must not resurrect it
  redis.call('ZADD', P .. 'evicted', now_ms(), id)
  redis.call('ZREMRANGEBYRANK', P .. 'evicted', 0, -100001)
  redis.call('ZREM', P .. 'finished', id)
  redis.call('ZREM', P .. 'finished:' .. owner, id)
  redis.call('ZREM', P .. 'changed', id)
  redis.call('HINCRBY', P .. 'bytes', 'app', -size)
  redis.call('HINCRBY', P .. 'bytes', 'owner:' .. owner, -size)
end
-- Evict the oldest finished jobs while a cap is passed; caps in CAPS = {jobs, bytes, owner jobs, owner bytes}.
local function evict(owner, caps)
  local evicted = 0
  local function over(zset, field, max_jobs, max_bytes)
    return redis.call('ZCARD', zset) > max_jobs
      or tonumber(redis.call('HGET', P .. 'bytes', field) or '0') > max_bytes
  end
  while over(P .. 'finished', 'app', caps[1], caps[2]) do
    local oldest = redis.call('ZRANGE', P .. 'finished', 0, 0)
    if #oldest == 0 then break end
    delete_job(oldest[1]); evicted = evicted + 1
  end
  local mine = P .. 'finished:' .. owner
  while over(mine, 'owner:' .. owner, caps[3], caps[4]) do
    local oldest = redis.call('ZRANGE', mine, 0, 0)
    if #oldest == 0 then break end
    delete_job(oldest[1]); evicted = evicted + 1
  end
  if evicted > 0 then redis.call('HINCRBY', P .. 'evictions', 'cap', evicted) end
  return evicted
end
-- Mark a job COMPLETED with `fields`, account for what it keeps, queue its webhook; returns evictions.
local function complete(id, finished_at, fields, caps)
  local job = P .. 'job:' .. id
  local was_queued = redis.call('ZREM', P .. 'queue', id) + redis.call('ZREM', P .. 'dispatched', id)
  redis.call('ZREM', P .. 'running', id)
  redis.call('ZREM', P .. 'deadlines', id)
  redis.call('HSET', job, 'state', 'COMPLETED', 'finished_at', finished_at, unpack(fields))
  redis.call('DEL', P .. 'previews:' .. id)  -- transient: only for watching a run
  local size = 0
  for _, name in ipairs({'request', 'result', 'error'}) do size = size + redis.call('HSTRLEN', job, name) end
  for _, entry in ipairs(redis.call('LRANGE', P .. 'logs:' .. id, 0, -1)) do size = size + #entry end
  local owner = redis.call('HGET', job, 'owner') or ''
  redis.call('HSET', job, 'bytes', size)
  local ms = now_ms()
  local order = ms * 1000 + redis.call('INCR', P .. 'fseq') % 1000  -- finish order, even within a millisecond
  redis.call('ZADD', P .. 'finished', order, id)
  redis.call('ZADD', P .. 'finished:' .. owner, order, id)
  redis.call('HINCRBY', P .. 'bytes', 'app', size)
  redis.call('HINCRBY', P .. 'bytes', 'owner:' .. owner, size)
  local url = redis.call('HGET', job, 'webhook_url')
  if url then  -- its body is made from the record at the first attempt, and kept for the others
    redis.call('HSET', P .. 'webhook:' .. id, 'url', url, 'owner', owner, 'attempts', 0)
    redis.call('ZADD', P .. 'outbox', ms, id)
  end
  changed(id)
  if was_queued > 0 then queue_changed() end
  return evict(owner, caps)
end
"""

# ARGV: P, epoch, id, max_queued, priority band, accept until (ms; its client is told 503 after it),
# n (field args), field/value pairs..., log entries...
# -> position; -1 the queue is full; -3 refused (withdrawn, or arrived after its client was told 503)
SUBMIT = r"""
local id = ARGV[3]
local job = P .. 'job:' .. id
local state = redis.call('HGET', job, 'state')
if state then  -- a retried submit whose first reply was lost: the same answer, not a second job
  if state == 'IN_QUEUE' then return position(id) end
  return 0  -- already claimed or done: it was accepted all the same
end
if redis.call('EXISTS', P .. 'withdrawn:' .. id) == 1 or now_ms() > tonumber(ARGV[6]) then return -3 end
if redis.call('ZCARD', P .. 'queue') >= tonumber(ARGV[4]) then return -1 end
local seq = redis.call('INCR', P .. 'seq')
local n = tonumber(ARGV[7])
redis.call('HSET', job, 'seq', seq, 'attempts', 0, 'claims', 0, unpack(ARGV, 8, 7 + n))
if #ARGV > 7 + n then redis.call('RPUSH', P .. 'logs:' .. id, unpack(ARGV, 8 + n)) end
redis.call('ZADD', P .. 'queue', tonumber(ARGV[5]) * 2^52 + seq, id)
local deadline = redis.call('HGET', job, 'deadline')
if deadline then redis.call('ZADD', P .. 'deadlines', tonumber(deadline) * 1000, id) end
changed(id)
queue_changed()
return position(id)
"""

# ARGV: P, epoch, lease_ms, started_at -> false | {id, HGETALL, LRANGE, token}
CLAIM = r"""
local head = redis.call('ZRANGE', P .. 'queue', 0, 0)
if #head == 0 then return false end
local id = head[1]
local job = P .. 'job:' .. id
redis.call('ZREM', P .. 'queue', id)
redis.call('HSET', job, 'state', 'IN_PROGRESS', 'started_at', ARGV[4], 'generating', '0')
redis.call('HINCRBY', job, 'attempts', 1)
local token = redis.call('HINCRBY', job, 'claims', 1)
redis.call('ZADD', P .. 'running', now_ms() + tonumber(ARGV[3]), id)
redis.call('ZADD', P .. 'dispatched', redis.call('INCR', P .. 'seq'), id)
changed(id)
queue_changed()
return {id, redis.call('HGETALL', job), redis.call('LRANGE', P .. 'logs:' .. id, 0, -1), token}
"""

# ARGV: P, epoch, id, token, log entries... -> 1, 0 when the claim is no longer this token's, -1 when the
# store lost the job
START = r"""
local id = ARGV[3]
if redis.call('EXISTS', P .. 'job:' .. id) == 0 then return -1 end
if not holds(id, ARGV[4]) then return 0 end
redis.call('ZREM', P .. 'dispatched', id)
redis.call('ZREM', P .. 'deadlines', id)  -- it started: its start deadline is met
redis.call('HSET', P .. 'job:' .. id, 'generating', '1')
if #ARGV > 4 then redis.call('RPUSH', P .. 'logs:' .. id, unpack(ARGV, 5)) end
changed(id)
queue_changed()
return 1
"""

# ARGV: P, epoch, id, token, log entries... -> 1, 0 when stale, -1 when the store lost the job
LOG = r"""
local id = ARGV[3]
if redis.call('EXISTS', P .. 'job:' .. id) == 0 then return -1 end
if not holds(id, ARGV[4]) then return 0 end
redis.call('RPUSH', P .. 'logs:' .. id, unpack(ARGV, 5))
changed(id)
return 1
"""

# ARGV: P, epoch, id, token, lease_ms -> 0 lost, 1 kept, 2 kept but cancel requested, 3 the job is gone
RENEW = r"""
local id = ARGV[3]
if redis.call('EXISTS', P .. 'job:' .. id) == 0 then return 3 end
if not holds(id, ARGV[4]) then return 0 end
redis.call('ZADD', P .. 'running', now_ms() + tonumber(ARGV[5]), id)
if redis.call('HGET', P .. 'job:' .. id, 'cancel_requested') == '1' then return 2 end
return 1
"""

# ARGV: P, epoch, id, token ('' = whoever holds it), finished_at, 4 caps, field/value pairs...
# -> {1, evicted} completed; {0} already completed or no longer this token's; {-1} unknown (lost)
FINISH = r"""
local id = ARGV[3]
local state = redis.call('HGET', P .. 'job:' .. id, 'state')
if not state then return {-1} end
if state == 'COMPLETED' or (ARGV[4] ~= '' and not holds(id, ARGV[4])) then return {0} end
local caps = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])}
return {1, complete(id, ARGV[5], {unpack(ARGV, 10)}, caps)}
"""

# A model replica died under the job. ARGV: P, epoch, id, token, max_attempts, finished_at, 4 caps,
# replica_failed error JSON, cancelled error JSON -> 'requeued' | 'failed' (it took down max_attempts
# replicas) | 'cancelled' (a cancel was asked for) | 'stale'
REQUEUE = r"""
local id = ARGV[3]
if not holds(id, ARGV[4]) then return 'stale' end
local job = P .. 'job:' .. id
local fields = redis.call('HMGET', job, 'attempts', 'seq', 'priority', 'cancel_requested')
local caps = {tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])}
if fields[4] == '1' then
  complete(id, ARGV[6], {'error', ARGV[12]}, caps)
  return 'cancelled'
end
if tonumber(fields[1]) >= tonumber(ARGV[5]) then
  complete(id, ARGV[6], {'error', ARGV[11]}, caps)
  return 'failed'
end
redis.call('ZREM', P .. 'running', id)
redis.call('ZREM', P .. 'dispatched', id)
redis.call('HSET', job, 'state', 'IN_QUEUE', 'generating', '0')
redis.call('HDEL', job, 'started_at')
redis.call('ZADD', P .. 'queue', tonumber(fields[3] or '0') * 2^52 + tonumber(fields[2]) - 2^50, id)
changed(id)
queue_changed()
return 'requeued'
"""

# ARGV: P, epoch, id, owner ('' = any), finished_at, 4 caps, cancelled error JSON
CANCEL = r"""
local id = ARGV[3]
local job = P .. 'job:' .. id
local fields = redis.call('HMGET', job, 'state', 'owner')
if not fields[1] or (ARGV[4] ~= '' and fields[2] ~= ARGV[4]) then return 'unknown' end
if fields[1] == 'COMPLETED' then return 'completed' end
if fields[1] == 'IN_PROGRESS' then
  redis.call('HSET', job, 'cancel_requested', '1')
  changed(id)
  return 'requested'
end
redis.call('HDEL', job, 'request')  -- never ran: only its status is kept
local caps = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])}
complete(id, ARGV[5], {'error', ARGV[10]}, caps)
return 'removed'
"""

# Expired leases. ARGV: P, epoch, max_attempts, finished_at, 4 caps, replica_failed error JSON, cancelled
# error JSON -> affected ids
RECLAIM = r"""
local jobs = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', now_ms())) do
  local f = redis.call('HMGET', P .. 'job:' .. id, 'seq', 'attempts', 'cancel_requested', 'priority')
  if f[1] then
    table.insert(jobs, {id = id, seq = tonumber(f[1]), attempts = tonumber(f[2]), cancel = f[3], band = f[4]})
  else  -- the record is gone: forget the lease
    redis.call('ZREM', P .. 'running', id)
    redis.call('ZREM', P .. 'dispatched', id)
  end
end
table.sort(jobs, function(a, b) return a.seq < b.seq end)
local caps = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}
local ids = {}
for _, j in ipairs(jobs) do
  if j.cancel == '1' then
    complete(j.id, ARGV[4], {'error', ARGV[10]}, caps)
  elseif j.attempts >= tonumber(ARGV[3]) then
    complete(j.id, ARGV[4], {'error', ARGV[9]}, caps)
  else
    redis.call('ZREM', P .. 'running', j.id)
    redis.call('ZREM', P .. 'dispatched', j.id)
    local job = P .. 'job:' .. j.id
    redis.call('HSET', job, 'state', 'IN_QUEUE', 'generating', '0')
    redis.call('HDEL', job, 'started_at')
    redis.call('ZADD', P .. 'queue', tonumber(j.band or '0') * 2^52 + j.seq - 2^50, j.id)
    changed(j.id)
    queue_changed()
  end
  table.insert(ids, j.id)
end
return ids
"""

# Jobs that were accepted but are gone from the store (a restart without persistence, FLUSHDB, eviction):
# each becomes a completed job with `error`, unless the store has it. ARGV: P, epoch, finished_at, 4 caps,
# error JSON, then (id, owner, webhook_url) triples -> the ids written
LOST = r"""
local caps = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])}
local written = {}
for i = 9, #ARGV, 3 do
  local id = ARGV[i]
  local job = P .. 'job:' .. id
  if redis.call('EXISTS', job) == 0 and not redis.call('ZSCORE', P .. 'evicted', id) then
    redis.call('HSET', job, 'request_id', id, 'owner', ARGV[i + 1], 'attempts', 0, 'submitted_at', ARGV[3])
    if ARGV[i + 2] ~= '' then redis.call('HSET', job, 'webhook_url', ARGV[i + 2]) end
    complete(id, ARGV[3], {'error', ARGV[8]}, caps)
    table.insert(written, id)
  end
end
return written
"""

# A run finished after its record vanished: keep its result as the job's. ARGV: P, epoch, id, finished_at,
# 4 caps, field/value pairs (the whole record) -> 1 written, 0 the store has the job
RESTORE = r"""
local id = ARGV[3]
if redis.call('EXISTS', P .. 'job:' .. id) == 1 then return 0 end
local caps = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}
complete(id, ARGV[4], {unpack(ARGV, 9)}, caps)
return 1
"""

# ARGV: P, epoch, finished before (ms), 4 caps -> evicted count
SWEEP = r"""
local evicted = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'finished', '-inf', tonumber(ARGV[3]) * 1000, 'LIMIT', 0, 1000)) do
  delete_job(id); evicted = evicted + 1
end
if evicted > 0 then redis.call('HINCRBY', P .. 'evictions', 'expired', evicted) end
return evicted
"""

# What a status mirror needs since its version. ARGV: P, epoch (unused), mirror's epoch, since, queue
# version, limit -> {epoch, version, qversion, reset, {id, state, owner, generating, inference_time, error,
# logs...}..., queued ids or false}
CHANGES = r"""
local epoch = redis.call('GET', P .. 'epoch') or ''
local version = tonumber(redis.call('GET', P .. 'version') or '0')
local qversion = tonumber(redis.call('GET', P .. 'qversion') or '0')
local since = tonumber(ARGV[4])
local reset = epoch ~= ARGV[3] or since > version
local ids
if not reset then
  ids = redis.call('ZRANGEBYSCORE', P .. 'changed', '(' .. since, '+inf', 'LIMIT', 0, tonumber(ARGV[6]) + 1)
  if #ids > tonumber(ARGV[6]) then reset = true end
end
if reset then  -- start over: what is queued or running (finished jobs are read when asked for)
  ids = redis.call('ZRANGE', P .. 'dispatched', 0, -1)
  for _, id in ipairs(redis.call('ZRANGE', P .. 'running', 0, -1)) do table.insert(ids, id) end
  for _, id in ipairs(redis.call('ZRANGE', P .. 'queue', 0, -1)) do table.insert(ids, id) end
end
local jobs = {}
local seen = {}
for _, id in ipairs(ids) do
  if not seen[id] then
    seen[id] = true
    local row = snapshot(id)
    if row then table.insert(jobs, row) end
  end
end
local queued = false
if reset or qversion > tonumber(ARGV[5]) then
  queued = redis.call('ZRANGE', P .. 'dispatched', 0, -1)
  for _, id in ipairs(redis.call('ZRANGE', P .. 'queue', 0, -1)) do table.insert(queued, id) end
end
return {epoch, version, qversion, reset and 1 or 0, jobs, queued}
"""

# Webhooks due, leased to the caller for lease_ms. ARGV: P, epoch, lease_ms, limit
# -> {{id, url, body or '', attempts, owner, and, kept from an evicted job: result, error, base_url}...}
OUTBOX_DUE = r"""
local now = now_ms()
local due = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'outbox', '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))) do
  local hook = P .. 'webhook:' .. id
  local fields = redis.call('HMGET', hook, 'url', 'body', 'owner', 'result', 'error', 'base_url')
  if fields[1] then
    local attempts = redis.call('HINCRBY', hook, 'attempts', 1)
    redis.call('ZADD', P .. 'outbox', now + tonumber(ARGV[3]), id)
    table.insert(due, {id, fields[1], fields[2] or '', attempts, fields[3] or '', fields[4] or '', fields[5] or '',
                       fields[6] or ''})
  else
    redis.call('ZREM', P .. 'outbox', id)
  end
end
return due
"""

# ARGV: P, epoch, id, retry in ms ('' = delivered or given up: forget it)
OUTBOX_SETTLE = r"""
local id = ARGV[3]
if ARGV[4] == '' then
  redis.call('ZREM', P .. 'outbox', id)
  redis.call('DEL', P .. 'webhook:' .. id)
else
  redis.call('ZADD', P .. 'outbox', now_ms() + tonumber(ARGV[4]), id)
end
return 1
"""

# The body of a webhook, made at its first attempt and kept for the others. ARGV: P, epoch, id, body
WEBHOOK_BODY = r"""
local hook = P .. 'webhook:' .. ARGV[3]
if redis.call('EXISTS', hook) == 0 then return 0 end
return redis.call('HSETNX', hook, 'body', ARGV[4])
"""

# ARGV: P, epoch, id -> {snapshot} or false
SNAPSHOT = r"""
return snapshot(ARGV[3])
"""

# A submit answered 503 (the store did not answer in time): remove the job if the store took it, and refuse
# it if it arrives late. ARGV: P, epoch, id, finished_at, 4 caps, cancelled error JSON, keep_ms
WITHDRAW = r"""
local id = ARGV[3]
local job = P .. 'job:' .. id
redis.call('SET', P .. 'withdrawn:' .. id, '1', 'PX', ARGV[10])
local state = redis.call('HGET', job, 'state')
if state == 'IN_PROGRESS' then  -- claimed meanwhile: its runner stops at its next renewal, and tells nobody
  redis.call('HSET', job, 'cancel_requested', '1')
  redis.call('HDEL', job, 'webhook_url')
  return 1
end
if state ~= 'IN_QUEUE' then return 0 end
redis.call('HDEL', job, 'request', 'webhook_url')
local caps = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}
complete(id, ARGV[4], {'error', ARGV[9]}, caps)
return 1
"""

# This replica stops: its job goes back to the queue front now, not after its lease lapses; a claim that
# never reached a model replica does not count as an attempt. ARGV: P, epoch, id, token, ran ('1'/'0')
RELEASE = r"""
local id = ARGV[3]
if not holds(id, ARGV[4]) then return 0 end
local job = P .. 'job:' .. id
local fields = redis.call('HMGET', job, 'seq', 'priority')
redis.call('ZREM', P .. 'running', id)
redis.call('ZREM', P .. 'dispatched', id)
redis.call('HSET', job, 'state', 'IN_QUEUE', 'generating', '0')
redis.call('HDEL', job, 'started_at')
if ARGV[5] == '0' then redis.call('HINCRBY', job, 'attempts', -1) end
redis.call('ZADD', P .. 'queue', tonumber(fields[2] or '0') * 2^52 + tonumber(fields[1]) - 2^50, id)
changed(id)
queue_changed()
return 1
"""

# Evictions since the last call, by reason, and the count reset (each eviction reported once). ARGV: P, epoch
TAKE_EVICTIONS = r"""
local counts = redis.call('HGETALL', P .. 'evictions')
redis.call('DEL', P .. 'evictions')
return counts
"""

# A running job the store lost (a flush, a restart without its data) is put back by its run, which holds
# the whole record: it finishes as if nothing happened, rather than completing as lost. ARGV: P, epoch, id,
# token, lease_ms, n (field args), field/value pairs..., log entries... -> 1 put back, 0 the store has it
READOPT = r"""
local id = ARGV[3]
local job = P .. 'job:' .. id
if redis.call('EXISTS', job) == 1 then return 0 end
local n = tonumber(ARGV[6])
redis.call('HSET', job, 'seq', redis.call('INCR', P .. 'seq'), 'claims', ARGV[4], 'state', 'IN_PROGRESS',
           'generating', '1', unpack(ARGV, 7, 6 + n))
if #ARGV > 6 + n then redis.call('RPUSH', P .. 'logs:' .. id, unpack(ARGV, 7 + n)) end
redis.call('ZADD', P .. 'running', now_ms() + tonumber(ARGV[5]), id)
changed(id)
return 1
"""

# Jobs whose start deadline passed before a model replica took them: completed with the error, never run
# (a claimed one's runner sees it on its next write and stops). ARGV: P, epoch, finished_at, 4 caps, error
# JSON -> the ids
EXPIRE = r"""
local caps = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])}
local ids = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'deadlines', '-inf', now_ms(), 'LIMIT', 0, 1000)) do
  local f = redis.call('HMGET', P .. 'job:' .. id, 'state', 'generating')
  if f[1] == 'IN_QUEUE' or (f[1] == 'IN_PROGRESS' and f[2] ~= '1') then
    complete(id, ARGV[3], {'error', ARGV[8]}, caps)
    table.insert(ids, id)
  else
    redis.call('ZREM', P .. 'deadlines', id)
  end
end
return ids
"""

# The webhook signing key the replicas share when no Secret gives one. ARGV: P, epoch, a fresh key -> the key
SIGNING_KEY = r"""
local key = P .. 'signing_key'
redis.call('SET', key, ARGV[3], 'NX')
return redis.call('GET', key)
"""

# A running job's preview, for its viewers. ARGV: P, epoch, id, token, kept, expire_ms, event JSON
# -> the entry's id, or '' when the claim is not this token's (a stale run shows nothing)
PREVIEW = r"""
local id = ARGV[3]
if not holds(id, ARGV[4]) then return '' end
local key = P .. 'previews:' .. id
local entry = redis.call('XADD', key, 'MAXLEN', ARGV[5], '*', 'event', ARGV[7])
redis.call('PEXPIRE', key, ARGV[6])
return entry
"""
