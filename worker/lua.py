"""The Redis scripts behind every job write. Each runs atomically.

Per-run ordering lives here. At enqueue each job is linked to the previous
job for the same run (`prev_job_id`, and the predecessor's `next_job_id`).
A worker may claim a job only when its nearest non-cancelled predecessor is
terminal, has vanished (expired or deleted), or is past its deadline plus
one job timeout (it can then never be applied). Otherwise the job is parked:
`waiting` with `blocked_on`, and the predecessor's terminal transition wakes
it by moving its queue entry to now.
"""

from worker.contract import STATS_KEY

# Shared helpers, prepended to the scripts that need them.
# Record prefix in P (ARGV-supplied by each script before use).
_HELPERS = """
-- Redis 6 needs this before a write that follows TIME; Redis 7 always does it.
if redis.replicate_commands then redis.replicate_commands() end

local function is_terminal(s)
  return s == "applied" or s == "rejected" or s == "failed" or s == "cancelled"
end

local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The job that must finish before one whose predecessor is `prev`, or false: the
-- nearest non-cancelled predecessor, unless it is terminal, has vanished (expired
-- or deleted) or is past its deadline plus `grace_ms` (it can never be applied).
local function blocker_from(P, prev, now, grace_ms)
  while prev do
    local p = redis.call("HMGET", P .. prev, "status", "deadline_ms", "prev_job_id")
    if not p[1] then return false end
    if p[1] ~= "cancelled" then
      if is_terminal(p[1]) then return false end
      if tonumber(p[2]) + grace_ms < now then return false end
      return prev
    end
    prev = p[3]
  end
  return false
end

local function blocker(P, rec, now, grace_ms)
  return blocker_from(P, redis.call("HGET", rec, "prev_job_id"), now, grace_ms)
end

-- Move the first non-cancelled successor (`nxt` and on) to the front of the queue
-- if it is parked: `blocked_on` set, `queued` (blocked from its enqueue) or `waiting`.
-- Score 0: due at once, and ahead of newer work (it waited longest).
local function wake_successor(P, Q, nxt)
  while nxt do
    local s = redis.call("HMGET", P .. nxt, "status", "blocked_on", "next_job_id")
    if not s[1] then return end
    if s[1] ~= "cancelled" then
      if (s[1] == "waiting" or s[1] == "queued") and s[2] then
        redis.call("ZADD", Q, "XX", 0, nxt)
      end
      return
    end
    nxt = s[3]
  end
end

-- Fleet-wide figures for /metrics (read by worker.fleet_stats): one counter per
-- kind of status move, "from>to" (">queued" for an enqueue), and event counts. One
-- HINCRBY per move: a live count and a total apart cost two. The hash lives a week
-- past the last enqueue: ENQUEUE refreshes its TTL once per batch.
local function count(field, by)
  redis.call("HINCRBY", "STATS", field, by)
end

local function keep_stats()
  redis.call("PEXPIRE", "STATS", 604800000)
end

local function moved(from, to)
  if from ~= to then count(from .. ">" .. to, 1) end
end
""".replace('"STATS"', f'"{STATS_KEY}"')

# KEYS: the queue, the client's pending set, the client's rate key, the recent-jobs
#       index, the pending-jobs index the sweeper walks
# ARGV: max queue depth, pending ttl ms, record prefix, gate grace ms, run prefix,
#       idempotency prefix, client max pending (0 = none), client rate interval ms
#       (0 = none), client burst ms, jobs the index keeps, gate recheck ms, the channel
#       that tells idle workers of new jobs, then one JSON item per change:
#       {"id", "run", "idem", "fp", "deadline", "fields": [k, v, ...]}
# A change whose predecessor is unfinished is queued parked (`blocked_on`, due at the
# recheck): the predecessor's end wakes it, and no worker takes it only to park it.
# Returns {"full"} | {"conflict", index, existing id} | {"pending", count} |
#         {"rate", wait ms} | {"ok", {kind, id, seq}, ...} with kind "new" or "duplicate"
ENQUEUE = (
    _HELPERS
    + """
local Q, PENDING, RATE, RECENT, INFLIGHT = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local max_depth, ttl = tonumber(ARGV[1]), ARGV[2]
local P, grace, R, I = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local max_pending, interval, burst = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local keep, recheck, enqueued = tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12]
local FIRST = 13
local items, fresh = {}, 0
for i = FIRST, #ARGV do
  local item = cjson.decode(ARGV[i])
  if item.idem ~= "" then
    local existing = redis.call("GET", I .. item.idem)
    if existing then
      local fp = redis.call("HGET", P .. existing, "fingerprint")
      if fp then
        if fp ~= item.fp then return {"conflict", i - FIRST, existing} end
        item.existing = existing
      end
    end
  end
  if not item.existing then fresh = fresh + 1 end
  items[#items + 1] = item
end
if fresh > 0 and redis.call("ZCARD", Q) + fresh > max_depth then return {"full"} end
local now = now_ms()
if fresh > 0 and max_pending > 0 then
  redis.call("ZREMRANGEBYSCORE", PENDING, "-inf", now)  -- past their deadline: not pending
  local count = redis.call("ZCARD", PENDING)
  if count + fresh > max_pending then return {"pending", count} end
end
if fresh > 0 and interval > 0 then
  local tat = tonumber(redis.call("GET", RATE) or now)
  if tat < now then tat = now end
  local new_tat = tat + fresh * interval
  if new_tat - burst > now then return {"rate", new_tat - burst - now} end
  redis.call("SET", RATE, new_tat, "PX", new_tat - now + 1000)
end
local out, queue = {"ok"}, {}
for _, item in ipairs(items) do
  if item.existing then
    out[#out + 1] = {"duplicate", item.existing, 0}
  else
    local run = R .. item.run
    local seq = redis.call("HINCRBY", run, "seq", 1)
    local prev = redis.call("HGET", run, "last")
    redis.call("HSET", run, "last", item.id)
    redis.call("PEXPIRE", run, ttl)
    local rec = P .. item.id
    local due, extra = now, {}
    if prev then
      extra = {"prev_job_id", prev}
      if redis.call("EXISTS", P .. prev) == 1 then
        redis.call("HSET", P .. prev, "next_job_id", item.id)
        local blocked = blocker_from(P, prev, now, grace)
        if blocked then
          extra = {"prev_job_id", prev, "blocked_on", blocked}
          due = now + recheck
        end
      end
    end
    if max_pending > 0 then
      -- Tells the job's end to take it out of its client's pending set.
      extra[#extra + 1] = "quota_pending"
      extra[#extra + 1] = "1"
      redis.call("ZADD", PENDING, item.deadline, item.id)
      redis.call("PEXPIRE", PENDING, ttl)
    end
    redis.call("HSET", rec, "seq", seq, unpack(item.fields))
    if #extra > 0 then redis.call("HSET", rec, unpack(extra)) end
    redis.call("PEXPIRE", rec, ttl)
    queue[#queue + 1] = due
    queue[#queue + 1] = item.id
    if item.idem ~= "" then redis.call("SET", I .. item.idem, item.id, "PX", ttl) end
    if keep > 0 then redis.call("ZADD", RECENT, now, item.id) end
    -- From the start, not from the claim: a failover can roll back the queue entry
    -- of a job never claimed, and the sweeper must find it.
    redis.call("ZADD", INFLIGHT, now, item.id)
    out[#out + 1] = {"new", item.id, seq}
  end
end
if #queue > 0 then redis.call("ZADD", Q, unpack(queue)) end
if fresh < #items then
  -- Counted, and a write even when nothing is new: a durability wait (WAIT, WAITAOF)
  -- covers its connection's writes, and this one follows the original's.
  count("deduplicated", #items - fresh)
end
if fresh > 0 then  -- once per batch: two commands per change would be a fifth of the work
  count(">queued", fresh)
  keep_stats()
  redis.call("PEXPIRE", INFLIGHT, ttl)
  redis.call("PUBLISH", enqueued, fresh)  -- idle workers wait for this, not for a poll
  if keep > 0 then
    redis.call("ZREMRANGEBYRANK", RECENT, 0, -keep - 1)
    redis.call("PEXPIRE", RECENT, ttl)
  end
end
return out
"""
)

# A worker's claim of one job it holds already (taken by TAKE as "held"), once its
# earlier try has settled.
# KEYS: record, the in-flight index, the queue
# ARGV: record prefix, grace ms, allowed statuses (space-separated), next check
#       time (ISO, shown while parked), status channel, job id, index ttl ms, recheck
#       ms, then claim field/value pairs (status included).
# A blocked job is parked and due again at the recheck, in this same step: its
# blocker's end, whenever it comes, is then always the later write.
# Returns {"claimed"} | {"blocked", predecessor id} | {"skip", status} | {"gone"}
CLAIM = (
    _HELPERS
    + """
local rec, P, INFLIGHT, Q = KEYS[1], ARGV[1], KEYS[2], KEYS[3]
local current = redis.call("HGET", rec, "status")
if not current then return {"gone"} end
local allowed = false
for s in string.gmatch(ARGV[3], "%S+") do
  if s == current then allowed = true end
end
if not allowed then return {"skip", current} end
local now = now_ms()
local prev = blocker(P, rec, now, tonumber(ARGV[2]))
if prev then
  redis.call("HSET", rec, "status", "waiting", "blocked_on", prev, "next_attempt_at", ARGV[4])
  redis.call("ZADD", Q, now + tonumber(ARGV[8]), ARGV[6])
  moved(current, "waiting")
  redis.call("PUBLISH", ARGV[5], ARGV[6])
  return {"blocked", prev}
end
redis.call("HDEL", rec, "blocked_on", "next_attempt_at")
redis.call("HSET", rec, unpack(ARGV, 9, #ARGV))
redis.call("ZADD", INFLIGHT, now, ARGV[6])
redis.call("PEXPIRE", INFLIGHT, ARGV[7])
moved(current, "running")
redis.call("PUBLISH", ARGV[5], ARGV[6])
return {"claimed"}
"""
)

# Take up to `n` due jobs for a worker, in one step. The queue is a sorted set of
# job ids by the time each is due; taking a job moves it to now + lease, so that
# no other worker sees it while its holder renews the lease, and a dead holder's
# jobs come due again when the lease lapses. Per job, by its record:
# - gone or terminal: out of the queue;
# - uncertain (`running`: its last holder died mid-call; `ambiguous`: its last
#   call got no answer) or past its deadline: "held", for the worker to settle;
# - behind an unfinished earlier change: parked (`waiting`, `blocked_on`), due at
#   the recheck; the earlier change's end wakes it;
# - else "claimed": `running`, its call due now (or, for a job the worker keeps
#   ready, as soon as one of its calls comes back: see `worker.dispatch`).
# KEYS: the queue
# ARGV: record prefix, n, lease ms, grace ms, recheck ms, now (ISO, for the record),
#       the recheck time (ISO, shown while parked), status channel
# Returns {kind, record field/value list, ...}: the record as read, before the claim;
# when fewer than `n` were due, then {"next", ms until the next job is due (-1: none)},
# for the worker to sleep until then (or until an enqueue wakes it).
TAKE = (
    _HELPERS
    + """
local Q, P, n = KEYS[1], ARGV[1], tonumber(ARGV[2])
local lease, grace, recheck = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now_iso, recheck_iso, channel = ARGV[6], ARGV[7], ARGV[8]
local now = now_ms()
-- Read past a few parked ones, so that one call usually fills every free slot.
local ids = redis.call("ZRANGEBYSCORE", Q, "-inf", now, "LIMIT", 0, n + 8)
local out, due, gone, moves = {}, {}, {}, {}
local function shift(from, to)
  local move = from .. ">" .. to
  moves[move] = (moves[move] or 0) + 1
end
for _, id in ipairs(ids) do
  if #out >= 2 * n then break end
  local h = redis.call("HGETALL", P .. id)
  local r = {}
  for i = 1, #h, 2 do r[h[i]] = h[i + 1] end
  local status = r.status
  if not status or is_terminal(status) then
    gone[#gone + 1] = id
  elseif status == "running" or r.ambiguous == "1" or tonumber(r.deadline_ms or 0) <= now then
    due[#due + 1] = now + lease
    due[#due + 1] = id
    out[#out + 1] = "held"
    out[#out + 1] = h
  else
    local prev = blocker_from(P, r.prev_job_id, now, grace)
    if prev then
      -- Its blocker's end wakes it; the recheck is only a net (for a blocker that
      -- expired, say), and it doubles with each park up to 16x: in a deep queue a
      -- change may wait minutes behind its run's earlier ones.
      local parks = tonumber(r.parks or 0) + 1
      redis.call("HSET", P .. id, "status", "waiting", "blocked_on", prev,
        "next_attempt_at", recheck_iso, "parks", parks)
      due[#due + 1] = now + recheck * math.min(2 ^ (parks - 1), 16)
      due[#due + 1] = id
      if status ~= "waiting" then shift(status, "waiting") end
      redis.call("PUBLISH", channel, id)
    else
      if r.blocked_on or r.next_attempt_at then
        redis.call("HDEL", P .. id, "blocked_on", "next_attempt_at")
      end
      redis.call("HSET", P .. id, "status", "running", "attempt_started_at", now_iso,
        "started_at", r.started_at or now_iso)
      due[#due + 1] = now + lease
      due[#due + 1] = id
      shift(status, "running")
      redis.call("PUBLISH", channel, id)
      out[#out + 1] = "claimed"
      out[#out + 1] = h
    end
  end
end
if #due > 0 then redis.call("ZADD", Q, unpack(due)) end
if #gone > 0 then redis.call("ZREM", Q, unpack(gone)) end
for move, by in pairs(moves) do count(move, by) end
if #out < 2 * n then
  local first = redis.call("ZRANGE", Q, 0, 0, "WITHSCORES")
  out[#out + 1] = "next"
  out[#out + 1] = first[2] and math.max(0, tonumber(first[2]) - now) or -1
end
return out
"""
)

# Make queued jobs due `ms` from now by Redis's clock (every queue score is): to
# renew the leases of the jobs a worker holds ("GT": never sooner than they are
# due), or to requeue one after a pause. Never queues a job that left the queue
# meanwhile (XX). KEYS: the queue   ARGV: ms from now, "GT" or "", then job ids
DUE = (
    _HELPERS
    + """
local at = now_ms() + tonumber(ARGV[1])
local args = {}
for i = 3, #ARGV do
  args[#args + 1] = at
  args[#args + 1] = ARGV[i]
end
if ARGV[2] == "GT" then return redis.call("ZADD", KEYS[1], "XX", "GT", unpack(args)) end
return redis.call("ZADD", KEYS[1], "XX", unpack(args))
"""
)

# KEYS: record, the queue, the recent-failures index, the in-flight index, the verify queue
# ARGV: record prefix, client prefix, allowed statuses (space-separated), record ttl ms (0 = leave),
#       channel to publish the job id on, job id, jobs the failures index keeps, due in
#       ms (-1 = leave the queue entry as it is), when to check for a duplicate (ms since
#       the epoch, 0 = never), number of fields to delete, those fields, then field/value
#       pairs to set (status first).
# A terminal status leaves the queue and wakes the next change to the run if parked
# behind this one; "due in" requeues a job that goes on waiting.
# Returns {1, status} when applied, {0, current status or ""} when not.
TRANSITION = (
    _HELPERS
    + """
local rec, Q, P, C, id = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[6]
local ndel = tonumber(ARGV[10])
-- One read for all this needs, the fields to delete included: most are absent.
local r = redis.call("HMGET", rec, "status", "next_job_id", "client_id", "quota_pending",
  unpack(ARGV, 11, 10 + ndel))
local current = r[1]
if not current then return {0, ""} end
local allowed = false
for s in string.gmatch(ARGV[3], "%S+") do
  if s == current then allowed = true end
end
if not allowed then return {0, current} end
local ttl, due_in, verify_at = tonumber(ARGV[4]), tonumber(ARGV[8]), tonumber(ARGV[9])
local present = {}
for i = 1, ndel do
  if r[4 + i] then present[#present + 1] = ARGV[10 + i] end
end
if #present > 0 then redis.call("HDEL", rec, unpack(present)) end
local first = 11 + ndel
redis.call("HSET", rec, unpack(ARGV, first, #ARGV))
local status = ARGV[first + 1]
if verify_at > 0 then
  redis.call("ZADD", KEYS[5], verify_at, id)
  redis.call("PEXPIRE", KEYS[5], ttl)
end
moved(current, status)
if is_terminal(status) then
  redis.call("ZREM", Q, id)
  redis.call("ZREM", KEYS[4], id)
  if r[2] then wake_successor(P, Q, r[2]) end
  if r[4] then redis.call("ZREM", C .. r[3] .. ":pending", id) end
  local keep = tonumber(ARGV[7])
  if keep > 0 and (status == "rejected" or status == "failed") then
    redis.call("ZADD", KEYS[3], now_ms(), id)
    redis.call("ZREMRANGEBYRANK", KEYS[3], 0, -keep - 1)
    redis.call("PEXPIRE", KEYS[3], ttl)
  end
elseif due_in >= 0 then
  redis.call("ZADD", Q, now_ms() + due_in, id)
end
if ttl > 0 then redis.call("PEXPIRE", rec, ttl) end
redis.call("PUBLISH", ARGV[5], id)
return {1, status}
"""
)

# Requeue the in-flight jobs that lost their queue entry while still pending (a
# failover can roll back the entry, not the record), and refresh the rest.
# KEYS: the queue, the in-flight index   ARGV: record prefix, then job ids (the
# candidates, oldest first). Returns the requeued job ids.
SWEEP = (
    _HELPERS
    + """
local Q, INFLIGHT, P = KEYS[1], KEYS[2], ARGV[1]
local now, requeued = now_ms(), {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local status = redis.call("HGET", P .. id, "status")
  if not status or is_terminal(status) then
    redis.call("ZREM", INFLIGHT, id)
  elseif redis.call("ZSCORE", Q, id) then
    redis.call("ZADD", INFLIGHT, "XX", now, id)  -- alive: look again next time
  else
    redis.call("ZADD", Q, now, id)
    redis.call("ZADD", INFLIGHT, "XX", now, id)
    count("swept", 1)
    requeued[#requeued + 1] = id
  end
end
return requeued
"""
)

# What a caller waits for, for progress messages: the unfinished earlier changes to
# the same run (up to a cap), and the job's place in the queue (-1 if not there).
# KEYS: record, the queue   ARGV: record prefix, cap, job id
PROGRESS = (
    _HELPERS
    + """
local P, cap = ARGV[1], tonumber(ARGV[2])
local ahead, steps = 0, 0
local prev = redis.call("HGET", KEYS[1], "prev_job_id")
while prev and steps < cap do
  local p = redis.call("HMGET", P .. prev, "status", "prev_job_id")
  if not p[1] then break end
  -- An earlier change that finished means every change before it finished too;
  -- a cancelled one says nothing about those before it.
  if is_terminal(p[1]) and p[1] ~= "cancelled" then break end
  if p[1] ~= "cancelled" then ahead = ahead + 1 end
  prev, steps = p[2], steps + 1
end
local rank = redis.call("ZRANK", KEYS[2], ARGV[3])
return {ahead, rank or -1}
"""
)

# Generic cell rate algorithm: one Prefect call per `interval` across every
# worker, with `burst` calls of slack. A call books its turn: the caller waits
# until then and sends, without asking again (callers that asked again when
# their wait was over all woke together, and all but one waited once more: 67
# commands per call with 16 calls waiting, bench/b6_queue_ceiling.py).
# KEYS: limiter   ARGV: interval ms, burst ms, longest wait ms to book
# Returns {1, ms until the booked turn}, or {0, ms until a turn} (nothing booked).
RATE_LIMIT = (
    _HELPERS
    + """
local now = now_ms()
local interval, burst, longest = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call("GET", KEYS[1]) or now)
if tat < now then tat = now end
local wait = math.max(tat - burst - now, 0)
if wait > longest then return {0, wait} end
local new_tat = tat + interval
redis.call("SET", KEYS[1], new_tat, "PX", new_tat - now + 1000)
return {1, wait}
"""
)
