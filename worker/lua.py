"""The Redis scripts behind every job write. Each runs atomically.

Per-run ordering lives here. At enqueue each job is linked to the previous
job for the same run (`prev_job_id`, and the predecessor's `next_job_id`).
A worker may claim a job only when its nearest non-cancelled predecessor is
terminal, has vanished (expired or deleted), or is past its deadline plus
one job timeout (it can then never be applied). Otherwise the job is parked:
`waiting` with `blocked_on`, and the predecessor's terminal transition wakes
it by moving its queue entry to now.
"""

from worker.contract import STATS_LIVE_KEY, STATS_TOTAL_KEY

# Shared helpers, prepended to the scripts that need them.
# Record prefix in P (ARGV-supplied by each script before use).
_HELPERS = """
-- Redis 6 needs this before a write that follows TIME; Redis 7 always does it.
if redis.replicate_commands then redis.replicate_commands() end

local function is_terminal(s)
  return s == "applied" or s == "rejected" or s == "failed" or s == "cancelled"
end

-- The predecessor job id this record must wait for, or false.
local function blocker(P, rec, now_ms, grace_ms)
  local prev = redis.call("HGET", rec, "prev_job_id")
  while prev do
    local p = redis.call("HMGET", P .. prev, "status", "deadline_ms", "prev_job_id")
    if not p[1] then return false end
    if p[1] ~= "cancelled" then
      if is_terminal(p[1]) then return false end
      if tonumber(p[2]) + grace_ms < now_ms then return false end
      return prev
    end
    prev = p[3]
  end
  return false
end

-- Move the first parked, non-cancelled successor of `rec` to the front of the queue.
local function wake_successor(P, Q, rec, now_ms)
  local nxt = redis.call("HGET", rec, "next_job_id")
  while nxt do
    local s = redis.call("HMGET", P .. nxt, "status", "blocked_on", "next_job_id")
    if not s[1] then return end
    if s[1] ~= "cancelled" then
      if s[1] == "waiting" and s[2] then redis.call("ZADD", Q, "XX", now_ms, nxt) end
      return
    end
    nxt = s[3]
  end
end

local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Fleet-wide figures for /metrics: totals per outcome, and how many jobs are in
-- each live status. Kept a week past the last change, like any key with a TTL.
local function count(key, field, by)
  redis.call("HINCRBY", key, field, by)
  redis.call("PEXPIRE", key, 604800000)
end

local function count_total(field, by) count("STATS_TOTAL", field, by) end
local function count_live(field, by) count("STATS_LIVE", field, by) end

local function moved(from, to)
  if from == to then return end
  if from then count("STATS_LIVE", from, -1) end
  if is_terminal(to) then count("STATS_TOTAL", to, 1) else count("STATS_LIVE", to, 1) end
  if from == "running" and to == "waiting" then count("STATS_TOTAL", "retried", 1) end
end
""".replace("STATS_LIVE", STATS_LIVE_KEY).replace("STATS_TOTAL", STATS_TOTAL_KEY)

# KEYS: arq queue, the client's pending set, the client's rate key, the recent-jobs
#       index, the pending-jobs index the sweeper walks
# ARGV: max queue depth, pending ttl ms, record prefix, arq job prefix, run prefix,
#       idempotency prefix, client max pending (0 = none), client rate interval ms
#       (0 = none), client burst ms, jobs the index keeps, then one JSON item per change:
#       {"id", "payload", "run", "idem", "fp", "deadline", "fields": [k, v, ...]}
# Returns {"full"} | {"conflict", index, existing id} | {"pending", count} |
#         {"rate", wait ms} | {"ok", {kind, id, seq}, ...} with kind "new" or "duplicate"
ENQUEUE = (
    _HELPERS
    + """
local Q, PENDING, RATE, RECENT, INFLIGHT = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local max_depth, ttl = tonumber(ARGV[1]), ARGV[2]
local P, J, R, I = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local max_pending, interval, burst = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local keep = tonumber(ARGV[10])
local FIRST = 11
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
local out = {"ok"}
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
    redis.call("HSET", rec, "seq", seq, unpack(item.fields))
    if prev then
      redis.call("HSET", rec, "prev_job_id", prev)
      if redis.call("EXISTS", P .. prev) == 1 then
        redis.call("HSET", P .. prev, "next_job_id", item.id)
      end
    end
    redis.call("PEXPIRE", rec, ttl)
    redis.call("SET", J .. item.id, item.payload, "PX", ttl)
    redis.call("ZADD", Q, now, item.id)
    if item.idem ~= "" then redis.call("SET", I .. item.idem, item.id, "PX", ttl) end
    if max_pending > 0 then
      redis.call("ZADD", PENDING, item.deadline, item.id)
      redis.call("PEXPIRE", PENDING, ttl)
    end
    if keep > 0 then redis.call("ZADD", RECENT, now, item.id) end
    -- From the start, not from the claim: a failover can roll back arq's queue entry
    -- of a job never claimed, and the sweeper must find it.
    redis.call("ZADD", INFLIGHT, now, item.id)
    out[#out + 1] = {"new", item.id, seq}
  end
end
if fresh < #items then
  -- Counted, and a write even when nothing is new: a durability wait (WAIT, WAITAOF)
  -- covers its connection's writes, and this one follows the original's.
  count_total("deduplicated", #items - fresh)
end
if fresh > 0 then  -- once per batch: two commands per change would be a fifth of the work
  count_total("enqueued", fresh)
  count_live("queued", fresh)
  redis.call("PEXPIRE", INFLIGHT, ttl)
  if keep > 0 then
    redis.call("ZREMRANGEBYRANK", RECENT, 0, -keep - 1)
    redis.call("PEXPIRE", RECENT, ttl)
  end
end
return out
"""
)

# KEYS: record, the in-flight index
# ARGV: record prefix, grace ms, allowed statuses (space-separated), next check
#       time (ISO, shown while parked), status channel, job id, index ttl ms, then
#       claim field/value pairs (status included).
# Returns {"claimed"} | {"blocked", predecessor id} | {"skip", status} | {"gone"}
CLAIM = (
    _HELPERS
    + """
local rec, P, INFLIGHT = KEYS[1], ARGV[1], KEYS[2]
local current = redis.call("HGET", rec, "status")
if not current then return {"gone"} end
local allowed = false
for s in string.gmatch(ARGV[3], "%S+") do
  if s == current then allowed = true end
end
if not allowed then return {"skip", current} end
local prev = blocker(P, rec, now_ms(), tonumber(ARGV[2]))
if prev then
  redis.call("HSET", rec, "status", "waiting", "blocked_on", prev, "next_attempt_at", ARGV[4])
  moved(current, "waiting")
  redis.call("PUBLISH", ARGV[5], ARGV[6])
  return {"blocked", prev}
end
redis.call("HDEL", rec, "blocked_on", "next_attempt_at")
redis.call("HSET", rec, unpack(ARGV, 8, #ARGV))
redis.call("ZADD", INFLIGHT, now_ms(), ARGV[6])
redis.call("PEXPIRE", INFLIGHT, ARGV[7])
moved(current, "running")
redis.call("PUBLISH", ARGV[5], ARGV[6])
return {"claimed"}
"""
)

# After a parked job's arq run has ended: if its blocker finished in the
# meantime (its wake-up may have been overwritten by arq re-scoring the job),
# move it to the front of the queue now.
# KEYS: record, arq queue   ARGV: record prefix, grace ms, job id
RECHECK = (
    _HELPERS
    + """
local rec = KEYS[1]
local s = redis.call("HMGET", rec, "status", "blocked_on")
if s[1] ~= "waiting" or not s[2] then return 0 end
if blocker(ARGV[1], rec, now_ms(), tonumber(ARGV[2])) then return 0 end
redis.call("ZADD", KEYS[2], "XX", now_ms(), ARGV[3])
return 1
"""
)

# KEYS: record, arq queue, the recent-failures index, the in-flight index, the verify queue
# ARGV: record prefix, client prefix, allowed statuses (space-separated), record ttl ms (0 = leave),
#       channel to publish the job id on, job id, jobs the failures index keeps, number
#       of fields to delete, those fields, then field/value pairs to set (status included).
#       A field `verify_at_ms` is not stored: it queues the job for a duplicate check.
# Returns {1, status} when applied, {0, current status or ""} when not.
TRANSITION = (
    _HELPERS
    + """
local rec, P, C = KEYS[1], ARGV[1], ARGV[2]
local current = redis.call("HGET", rec, "status")
if not current then return {0, ""} end
local allowed = false
for s in string.gmatch(ARGV[3], "%S+") do
  if s == current then allowed = true end
end
if not allowed then return {0, current} end
local ndel = tonumber(ARGV[8])
if ndel > 0 then redis.call("HDEL", rec, unpack(ARGV, 9, 8 + ndel)) end
local first = 9 + ndel
if first <= #ARGV then redis.call("HSET", rec, unpack(ARGV, first, #ARGV)) end
local verify_at = redis.call("HGET", rec, "verify_at_ms")
if verify_at then
  redis.call("HDEL", rec, "verify_at_ms")
  redis.call("ZADD", KEYS[5], verify_at, ARGV[6])
  redis.call("PEXPIRE", KEYS[5], ARGV[4])
end
local status = redis.call("HGET", rec, "status")
moved(current, status)
if is_terminal(status) then
  redis.call("ZREM", KEYS[4], ARGV[6])
  wake_successor(P, KEYS[2], rec, now_ms())
  local client = redis.call("HGET", rec, "client_id")
  if client then redis.call("ZREM", C .. client .. ":pending", ARGV[6]) end
  local keep = tonumber(ARGV[7])
  if keep > 0 and (status == "rejected" or status == "failed") then
    redis.call("ZADD", KEYS[3], now_ms(), ARGV[6])
    redis.call("ZREMRANGEBYRANK", KEYS[3], 0, -keep - 1)
    redis.call("PEXPIRE", KEYS[3], ARGV[4])
  end
end
if tonumber(ARGV[4]) > 0 then redis.call("PEXPIRE", rec, ARGV[4]) end
redis.call("PUBLISH", ARGV[5], ARGV[6])
return {1, status}
"""
)

# Requeue the in-flight jobs that lost their arq queue entry while still pending
# (arq drops a job it times out), and refresh the rest. KEYS: arq queue, in-flight
# index   ARGV: record prefix, arq job prefix, arq in-progress prefix, arq job ttl ms,
# then job id, arq payload pairs (the candidates, oldest first).
# Returns the requeued job ids.
SWEEP = (
    _HELPERS
    + """
local Q, INFLIGHT = KEYS[1], KEYS[2]
local P, J, IP, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, requeued = now_ms(), {}
for i = 5, #ARGV, 2 do
  local id, payload = ARGV[i], ARGV[i + 1]
  local status = redis.call("HGET", P .. id, "status")
  if not status or is_terminal(status) then
    redis.call("ZREM", INFLIGHT, id)
  elseif redis.call("ZSCORE", Q, id) or redis.call("EXISTS", IP .. id) == 1 then
    redis.call("ZADD", INFLIGHT, "XX", now, id)  -- alive: look again next time
  else
    redis.call("SET", J .. id, payload, "PX", ttl)
    redis.call("ZADD", Q, now, id)
    redis.call("ZADD", INFLIGHT, "XX", now, id)
    count_total("swept", 1)
    requeued[#requeued + 1] = id
  end
end
return requeued
"""
)

# What a caller waits for, for progress messages: the unfinished earlier changes to
# the same run (up to a cap), and the job's place in the arq queue (-1 if not there).
# KEYS: record, arq queue   ARGV: record prefix, cap, job id
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
# worker, with `burst` calls of slack. KEYS: limiter   ARGV: interval ms, burst ms
# Returns 0 when the call may go now, else the milliseconds to wait.
RATE_LIMIT = (
    _HELPERS
    + """
local now = now_ms()
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call("GET", KEYS[1]) or now)
if tat < now then tat = now end
if tat - burst > now then return tat - burst - now end
local new_tat = tat + interval
redis.call("SET", KEYS[1], new_tat, "PX", new_tat - now + 1000)
return 0
"""
)
