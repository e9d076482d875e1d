"""Job records in Redis: atomic enqueue, the ordering gate, status transitions.

Every write is one Lua script (`worker.lua`), so a crash can never leave a
record without its queue entry (or the reverse), and a cancel can never race
a worker's claim.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from arq.constants import default_queue_name, in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from worker import lua
from worker.contract import (
    APPLY_STATE_CHANGE,
    BATCH_KEY_PREFIX,
    CLIENT_KEY_PREFIX,
    FAILURES_KEY,
    IDEMPOTENCY_KEY_PREFIX,
    INFLIGHT_KEY,
    JOB_KEY_PREFIX,
    RATE_LIMIT_KEY,
    RECENT_KEY,
    RUN_KEY_PREFIX,
    STATS_TOTAL_KEY,
    STATUS_CHANNEL,
    TERMINAL_CHANNEL,
    VERIFY_KEY,
    Batch,
    JobRecord,
    Status,
    fields_to_hash,
    job_key,
    json_serializer,
    utcnow,
)
from worker.durability import DurableWrites


class QueueFull(Exception):
    """The queue holds `max_queue_depth` jobs; the caller should retry later."""


class IdempotencyConflict(Exception):
    """An idempotency key is already used for a different change.

    `index` is the position of the offending change in the submitted batch.
    """

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(f"changes[{index}]: {detail}")
        self.index = index
        self.detail = detail


@dataclass(frozen=True)
class Enqueued:
    record: JobRecord
    deduplicated: bool


class QuotaExceeded(Exception):
    """A client went past its pending-jobs or enqueue-rate quota; nothing was written."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ClientQuota:
    """Per-client limits; None means unlimited."""

    max_pending: int | None = None
    max_rps: float | None = None
    burst: int = 1_000


@dataclass(frozen=True)
class Transition:
    applied: bool
    status: Status | None  # None: the record does not exist (expired or never did)


@dataclass(frozen=True)
class Claim:
    outcome: Literal["claimed", "blocked", "skip", "gone"]
    blocked_on: str | None = None


class JobStore:
    """Reads and writes job records; shared by the frontend and the workers."""

    def __init__(
        self,
        redis: Redis,
        *,
        result_ttl_s: int,
        job_deadline_s: float,
        max_queue_depth: int,
        gate_grace_s: float = 0.0,
        quota: ClientQuota = ClientQuota(),
        queue_name: str = default_queue_name,
        recent_jobs: int = 10_000,
        durability: DurableWrites | None = None,
    ) -> None:
        self.redis = redis
        # Tickets and claims wait for it; the rest may be lost and redone (see worker.job).
        self.durability = durability or DurableWrites()
        self.recent_jobs = recent_jobs  # how many of the newest jobs the indexes keep
        self.result_ttl_s = result_ttl_s
        self.job_deadline_s = job_deadline_s
        self.max_queue_depth = max_queue_depth
        self.gate_grace_ms = int(gate_grace_s * 1000)
        self.quota = quota
        self.queue_name = queue_name
        self._enqueue = redis.register_script(lua.ENQUEUE)
        self._claim = redis.register_script(lua.CLAIM)
        self._recheck = redis.register_script(lua.RECHECK)
        self._transition = redis.register_script(lua.TRANSITION)
        self._progress = redis.register_script(lua.PROGRESS)
        self._sweep = redis.register_script(lua.SWEEP)

    @property
    def pending_ttl_ms(self) -> int:
        """TTL of a record that is not terminal yet: outlives its deadline, then expires."""
        return int((self.job_deadline_s + self.result_ttl_s) * 1000)

    async def enqueue(self, record: JobRecord) -> Enqueued:
        return (await self.enqueue_many([record]))[0]

    async def enqueue_many(self, records: Sequence[JobRecord]) -> list[Enqueued]:
        """Store records and their arq queue entries in one atomic round trip, in order.

        All or nothing: a full queue or an idempotency conflict writes nothing. Returns
        once the write is stored at the durability level; NotDurable if it is not in time.
        """
        if not records:
            return []
        client = records[0].client_id
        quota = self.quota
        if quota.max_rps and len(records) > quota.burst:
            raise QuotaExceeded(
                f"a batch of {len(records)} changes is more than client {client}'s burst of "
                f"{quota.burst} (PMQ_CLIENT_BURST); split it"
            )
        unique, positions = _dedupe_keys(records)
        origin = [index for index, (_, first) in enumerate(positions) if first]
        items = [json.dumps(_item(record)) for record in unique]
        interval_ms = round(1000 / quota.max_rps) if quota.max_rps else 0
        reply = await self.durability.run(
            self.redis,
            self._enqueue,
            [
                self.queue_name,
                f"{CLIENT_KEY_PREFIX}{client}:pending",
                f"{CLIENT_KEY_PREFIX}{client}:rate",
                RECENT_KEY,
                INFLIGHT_KEY,
            ],
            [
                self.max_queue_depth,
                self.pending_ttl_ms,
                JOB_KEY_PREFIX,
                job_key_prefix,
                RUN_KEY_PREFIX,
                IDEMPOTENCY_KEY_PREFIX,
                quota.max_pending or 0,
                interval_ms,
                interval_ms * quota.burst,
                self.recent_jobs,
                *items,
            ],
        )
        outcome = _text(reply[0])
        if outcome == "full":
            raise QueueFull
        if outcome == "pending":
            raise QuotaExceeded(
                f"client {client} has {int(reply[1])} pending changes, its limit is "
                f"{quota.max_pending} (PMQ_CLIENT_MAX_PENDING); retry when some finish"
            )
        if outcome == "rate":
            wait_s = int(reply[1]) / 1000
            raise QuotaExceeded(
                f"client {client} may enqueue {quota.max_rps:g} changes/s "
                f"(PMQ_CLIENT_MAX_RPS); retry in {wait_s:.1f} s",
                retry_after_s=wait_s,
            )
        if outcome == "conflict":
            raise IdempotencyConflict(
                origin[int(reply[1])],
                f"already used by job {_text(reply[2])} for a different change",
            )
        results: list[Enqueued] = []
        existing_ids = [_text(row[1]) for row in reply[1:] if _text(row[0]) == "duplicate"]
        existing = dict(zip(existing_ids, await self.load_many(existing_ids), strict=True))
        for record, row in zip(unique, reply[1:], strict=True):
            if _text(row[0]) == "new":
                results.append(Enqueued(record.model_copy(update={"seq": int(row[2])}), False))
                continue
            found = existing[_text(row[1])]
            # The original can expire between the script and this read only at the very
            # end of its TTL; its ticket is then the best answer we have.
            results.append(Enqueued(found or record, True))
        return [
            results[index] if first else Enqueued(results[index].record, True)
            for index, first in positions
        ]

    async def load(self, job_id: str) -> JobRecord | None:
        data: dict[bytes, bytes] = await self.redis.hgetall(job_key(job_id))  # type: ignore[misc]
        return JobRecord.from_hash(_decode(data)) if data else None

    async def load_many(self, job_ids: Iterable[str]) -> list[JobRecord | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(job_key(job_id))
            rows = await pipe.execute()
        return [JobRecord.from_hash(_decode(row)) if row else None for row in rows]

    async def claim(
        self,
        job_id: str,
        *,
        allowed: Iterable[Status],
        set_fields: dict[str, Any],
        recheck_at: datetime,
    ) -> Claim:
        """Mark the job `running` unless an earlier change to its run is unfinished.

        A blocked job is parked (`waiting`, `blocked_on`); see `worker.lua`. Returns once
        the claim is stored at the durability level (NotDurable if not in time): a claim
        lost after Prefect had the change would let the job be applied twice.
        """
        encoded = fields_to_hash({**set_fields, "status": Status.RUNNING.value})
        reply = await self.durability.run(
            self.redis,
            self._claim,
            [job_key(job_id), INFLIGHT_KEY],
            [
                JOB_KEY_PREFIX,
                self.gate_grace_ms,
                " ".join(s.value for s in allowed),
                recheck_at.isoformat(),
                STATUS_CHANNEL,
                job_id,
                self.pending_ttl_ms,
                *_flatten(encoded),
            ],
        )
        outcome = _text(reply[0])
        if outcome == "blocked":
            return Claim("blocked", _text(reply[1]))
        if outcome in ("claimed", "skip", "gone"):
            return Claim(outcome)  # type: ignore[arg-type]
        raise RuntimeError(f"unexpected claim reply {reply!r}")

    async def recheck_parked(self, job_id: str) -> bool:
        """Requeue a parked job at once if its blocker finished; True if it did."""
        woke = await self._recheck(
            keys=[job_key(job_id), self.queue_name],
            args=[JOB_KEY_PREFIX, self.gate_grace_ms, job_id],
        )
        return bool(woke)

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

        A terminal status gets the result TTL, wakes long-pollers and wakes the
        next change to the same run if it is parked behind this one.
        """
        terminal = status.is_terminal
        encoded = fields_to_hash({**(set_fields or {}), "status": status.value})
        clear = list(clear_fields)
        reply = await self._transition(
            keys=[job_key(job_id), self.queue_name, FAILURES_KEY, INFLIGHT_KEY, VERIFY_KEY],
            args=[
                JOB_KEY_PREFIX,
                CLIENT_KEY_PREFIX,
                " ".join(s.value for s in allowed),
                self.result_ttl_s * 1000 if terminal else 0,
                TERMINAL_CHANNEL if terminal else STATUS_CHANNEL,
                job_id,
                self.recent_jobs,
                len(clear),
                *clear,
                *_flatten(encoded),
            ],
        )
        current = _text(reply[1])
        return Transition(applied=bool(reply[0]), status=Status(current) if current else None)

    async def sweep(self, *, claimed_before: datetime, limit: int = 500) -> list[str]:
        """Requeue jobs last seen before `claimed_before` that are pending but in no queue.

        arq's own job timeout can leave one (it drops the job, not our record), and so
        can a Redis failover that rolled back arq's entries but not the record (or made
        arq start a job twice and drop it). All are rare; this makes them harmless.
        """
        candidates = await self.redis.zrangebyscore(
            INFLIGHT_KEY, "-inf", int(claimed_before.timestamp() * 1000), start=0, num=limit
        )
        if not candidates:
            return []
        now_ms = int(utcnow().timestamp() * 1000)
        args: list[str | int] = [
            JOB_KEY_PREFIX,
            job_key_prefix,
            in_progress_key_prefix,
            self.pending_ttl_ms,
        ]
        for raw in candidates:
            job_id = _text(raw)
            args += [job_id, _payload(job_id, now_ms).decode()]
        requeued = await self._sweep(keys=[self.queue_name, INFLIGHT_KEY], args=args)
        return [_text(job_id) for job_id in requeued]

    async def due_verifications(self, *, limit: int = 100) -> list[str]:
        """Applied jobs whose duplicate check is due."""
        now_ms = int(utcnow().timestamp() * 1000)
        ids = await self.redis.zrangebyscore(VERIFY_KEY, "-inf", now_ms, start=0, num=limit)
        return [_text(job_id) for job_id in ids]

    async def verified(self, job_id: str, duplicates: int | None) -> None:
        """Record the duplicate check's finding (None: the record is gone) and dequeue it."""
        if duplicates:
            await self.redis.hincrby(STATS_TOTAL_KEY, "duplicated", 1)  # type: ignore[misc]
        if duplicates is not None:
            await self.transition(
                job_id,
                allowed=(Status.APPLIED,),
                status=Status.APPLIED,
                set_fields={"duplicate_transitions": duplicates},
            )
        await self.redis.zrem(VERIFY_KEY, job_id)

    async def progress(self, job_id: str, *, cap: int = 100) -> Progress:
        """What the job waits for: unfinished earlier changes to its run, its queue place."""
        ahead, rank = await self._progress(
            keys=[job_key(job_id), self.queue_name], args=[JOB_KEY_PREFIX, cap, job_id]
        )
        return Progress(ahead_in_run=int(ahead), capped=int(ahead) >= cap, queue_rank=int(rank))

    async def recent_ids(
        self, *, failures: bool = False, since_ms: int | None = None, offset: int = 0, count: int
    ) -> list[str]:
        """Newest first: job ids by enqueue time, or (`failures`) rejected and failed by finish."""
        ids = await self.redis.zrevrangebyscore(
            FAILURES_KEY if failures else RECENT_KEY,
            "+inf",
            "-inf" if since_ms is None else since_ms,
            start=offset,
            num=count,
        )
        return [_text(job_id) for job_id in ids]

    async def save_batch(self, batch: Batch) -> None:
        """Remember a batch's job ids for as long as any of its jobs can live."""
        # A task-mode caller holds only the batch id: it is kept as durably as the jobs.
        await self.durability.execute(
            self.redis,
            "SET",
            BATCH_KEY_PREFIX + batch.batch_id,
            batch.model_dump_json(),
            "PX",
            self.pending_ttl_ms,
        )

    async def mark_batch_cancelled(self, batch: Batch) -> None:
        updated = batch.model_copy(update={"cancel_requested": True})
        await self.redis.set(
            BATCH_KEY_PREFIX + batch.batch_id, updated.model_dump_json(), keepttl=True, xx=True
        )

    async def load_batch(self, batch_id: str) -> Batch | None:
        data = await self.redis.get(BATCH_KEY_PREFIX + batch_id)
        return Batch.model_validate_json(data) if data else None


@dataclass(frozen=True)
class Progress:
    ahead_in_run: int  # unfinished earlier changes to the same run
    capped: bool  # there may be more than `ahead_in_run`
    queue_rank: int  # jobs ahead in the arq queue; -1 when not queued


class RateLimiter:
    """One budget of Prefect calls per second shared by every worker process."""

    def __init__(self, redis: Redis, max_rps: float, *, burst: int = 1) -> None:
        self.interval_ms = max(1, round(1000 / max_rps))
        self.burst_ms = (burst - 1) * self.interval_ms
        self._script = redis.register_script(lua.RATE_LIMIT)

    async def try_acquire(self) -> float:
        """0 if a call may go now (and counts it), else the seconds to wait."""
        wait_ms = await self._script(keys=[RATE_LIMIT_KEY], args=[self.interval_ms, self.burst_ms])
        return int(wait_ms) / 1000


def _payload(job_id: str, enqueue_ms: int) -> bytes:
    """arq's queue entry for a job: only its id, as JSON."""
    return serialize_job(
        APPLY_STATE_CHANGE, (job_id,), {}, None, enqueue_ms, serializer=json_serializer
    )


def _item(record: JobRecord) -> dict[str, Any]:
    payload = _payload(record.job_id, int(record.enqueued_at.timestamp() * 1000))
    fields = record.to_hash()
    fields.pop("seq", None)
    return {
        "id": record.job_id,
        "payload": payload.decode(),
        "run": record.run_key,
        # Keys are per client: two clients may use the same key for different changes.
        "idem": f"{record.client_id}:{record.idempotency_key}" if record.idempotency_key else "",
        "fp": record.fingerprint,
        "deadline": record.deadline_ms,
        "fields": _flatten(fields),
    }


def _dedupe_keys(
    records: Sequence[JobRecord],
) -> tuple[list[JobRecord], list[tuple[int, bool]]]:
    """Collapse repeats of one idempotency key within a batch onto its first use.

    Returns the records to send and, per input, (index into those, is-first-use).
    """
    unique: list[JobRecord] = []
    first_use: dict[str, int] = {}
    positions: list[tuple[int, bool]] = []
    for index, record in enumerate(records):
        key = record.idempotency_key
        if key is not None and key in first_use:
            earlier = unique[first_use[key]]
            if earlier.fingerprint != record.fingerprint:
                raise IdempotencyConflict(
                    index, "used earlier in this batch for a different change"
                )
            positions.append((first_use[key], False))
            continue
        if key is not None:
            first_use[key] = len(unique)
        positions.append((len(unique), True))
        unique.append(record)
    return unique, positions


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(data: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in data.items()}
