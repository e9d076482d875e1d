"""Job records in Redis: atomic enqueue and compare-and-set status transitions.

Every write here is one Lua script, so a crash can never leave a record
without its queue entry (or the reverse), and a cancel can never race a
worker's claim.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from arq.constants import default_queue_name, job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from worker.contract import (
    APPLY_STATE_CHANGE,
    JOB_KEY_PREFIX,
    TERMINAL_CHANNEL,
    JobRecord,
    Status,
    fields_to_hash,
    idempotency_key,
    job_key,
    json_serializer,
    seq_key,
)

# KEYS: record, run sequence, arq job, arq queue, idempotency key ("" when none)
# ARGV: job id, arq payload, queue score ms, arq job ttl ms, record ttl ms,
#       max queue depth, fingerprint, record prefix, then field/value pairs
# Returns {"new", job_id, seq} | {"duplicate", job_id} | {"conflict", job_id} | {"full"}
_ENQUEUE = """
local idem = KEYS[5]
if idem ~= "" then
  local existing = redis.call("GET", idem)
  if existing then
    local fp = redis.call("HGET", ARGV[8] .. existing, "fingerprint")
    if fp == ARGV[7] then return {"duplicate", existing} end
    if fp then return {"conflict", existing} end
  end
end
if redis.call("ZCARD", KEYS[4]) >= tonumber(ARGV[6]) then return {"full"} end
local seq = redis.call("INCR", KEYS[2])
redis.call("PEXPIRE", KEYS[2], ARGV[5])
local fields = {"seq", seq}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call("HSET", KEYS[1], unpack(fields))
redis.call("PEXPIRE", KEYS[1], ARGV[5])
redis.call("SET", KEYS[3], ARGV[2], "PX", ARGV[4])
redis.call("ZADD", KEYS[4], ARGV[3], ARGV[1])
if idem ~= "" then redis.call("SET", idem, ARGV[1], "PX", ARGV[5]) end
return {"new", ARGV[1], seq}
"""

# KEYS: record
# ARGV: allowed statuses (space-separated), record ttl ms (0 = leave), channel to
#       publish the job id on ("" = none), number of fields to delete, those
#       fields, then field/value pairs to set.
# Returns {1, new status} when applied, {0, current status or ""} when not.
_TRANSITION = """
local current = redis.call("HGET", KEYS[1], "status")
if not current then return {0, ""} end
local allowed = false
for s in string.gmatch(ARGV[1], "%S+") do
  if s == current then allowed = true end
end
if not allowed then return {0, current} end
local ndel = tonumber(ARGV[4])
if ndel > 0 then redis.call("HDEL", KEYS[1], unpack(ARGV, 5, 4 + ndel)) end
local first = 5 + ndel
if first <= #ARGV then redis.call("HSET", KEYS[1], unpack(ARGV, first, #ARGV)) end
if tonumber(ARGV[2]) > 0 then redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
if ARGV[3] ~= "" then redis.call("PUBLISH", ARGV[3], string.sub(KEYS[1], #"%s" + 1)) end
return {1, redis.call("HGET", KEYS[1], "status")}
""".replace("%s", JOB_KEY_PREFIX)


class QueueFull(Exception):
    """The queue holds `max_queue_depth` jobs; the caller should retry later."""


class IdempotencyConflict(Exception):
    """The idempotency key names an existing job with a different change."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


@dataclass(frozen=True)
class Enqueued:
    record: JobRecord
    deduplicated: bool


@dataclass(frozen=True)
class Transition:
    applied: bool
    status: Status | None  # None: the record does not exist (expired or never did)


class JobStore:
    """Reads and writes job records; shared by the frontend and the workers."""

    def __init__(
        self,
        redis: Redis,
        *,
        result_ttl_s: int,
        job_deadline_s: float,
        max_queue_depth: int,
        queue_name: str = default_queue_name,
    ) -> None:
        self.redis = redis
        self.result_ttl_s = result_ttl_s
        self.job_deadline_s = job_deadline_s
        self.max_queue_depth = max_queue_depth
        self.queue_name = queue_name
        self._enqueue = redis.register_script(_ENQUEUE)
        self._transition = redis.register_script(_TRANSITION)

    @property
    def pending_ttl_ms(self) -> int:
        """TTL of a record that is not terminal yet: outlives its deadline, then expires."""
        return int((self.job_deadline_s + self.result_ttl_s) * 1000)

    async def enqueue(self, record: JobRecord) -> Enqueued:
        """Store the record and its arq queue entry in one atomic step."""
        enqueue_ms = int(record.enqueued_at.timestamp() * 1000)
        payload = serialize_job(
            APPLY_STATE_CHANGE, (record.job_id,), {}, None, enqueue_ms, serializer=json_serializer
        )
        fields = record.to_hash()
        fields.pop("seq", None)
        flat = [item for pair in fields.items() for item in pair]
        idem = idempotency_key(record.idempotency_key) if record.idempotency_key else ""
        reply = await self._enqueue(
            keys=[
                job_key(record.job_id),
                seq_key(record.run_type, record.run_id),
                job_key_prefix + record.job_id,
                self.queue_name,
                idem,
            ],
            args=[
                record.job_id,
                payload,
                enqueue_ms,
                self.pending_ttl_ms,
                self.pending_ttl_ms,
                self.max_queue_depth,
                record.fingerprint,
                JOB_KEY_PREFIX,
                *flat,
            ],
        )
        outcome = _text(reply[0])
        if outcome == "full":
            raise QueueFull
        if outcome == "conflict":
            raise IdempotencyConflict(_text(reply[1]))
        if outcome == "duplicate":
            existing = await self.load(_text(reply[1]))
            if existing is not None:
                return Enqueued(existing, deduplicated=True)
            # The original expired between the script and this read: very rare, and
            # the key is about to expire too; answering with the ticket we have is safe.
        return Enqueued(record.model_copy(update={"seq": int(reply[2])}), deduplicated=False)

    async def load(self, job_id: str) -> JobRecord | None:
        data: dict[bytes, bytes] = await self.redis.hgetall(job_key(job_id))  # type: ignore[misc]
        return JobRecord.from_hash(_decode(data)) if data else None

    async def load_many(self, job_ids: Iterable[str]) -> list[JobRecord | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(job_key(job_id))
            rows = await pipe.execute()
        return [JobRecord.from_hash(_decode(row)) if row else None for row in rows]

    async def transition(
        self,
        job_id: str,
        *,
        allowed: Iterable[Status],
        status: Status,
        set_fields: dict[str, Any] | None = None,
        clear_fields: Iterable[str] = (),
    ) -> Transition:
        """Move a job to `status` if it is currently in one of `allowed`.

        A terminal status gets the result TTL and wakes long-pollers.
        """
        terminal = status.is_terminal
        encoded = fields_to_hash({**(set_fields or {}), "status": status.value})
        clear = list(clear_fields)
        reply = await self._transition(
            keys=[job_key(job_id)],
            args=[
                " ".join(s.value for s in allowed),
                self.result_ttl_s * 1000 if terminal else 0,
                TERMINAL_CHANNEL if terminal else "",
                len(clear),
                *clear,
                *[item for pair in encoded.items() for item in pair],
            ],
        )
        current = _text(reply[1])
        return Transition(applied=bool(reply[0]), status=Status(current) if current else None)


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(data: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in data.items()}
