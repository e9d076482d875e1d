"""Job records in Redis: atomic enqueue, the ordering gate, status transitions.

Every write is one Lua script (`worker.lua`), so a crash can never leave a
record without its queue entry (or the reverse), and a cancel can never race
a worker's claim.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from redis.asyncio import Redis

from worker import lua
from worker.contract import (
    BATCH_KEY_PREFIX,
    CLIENT_KEY_PREFIX,
    ENQUEUED_CHANNEL,
    FAILURES_KEY,
    IDEMPOTENCY_KEY_PREFIX,
    INFLIGHT_KEY,
    JOB_KEY_PREFIX,
    QUEUE_KEY,
    RATE_LIMIT_KEY,
    RECENT_KEY,
    RUN_KEY_PREFIX,
    STATS_KEY,
    STATUS_CHANNEL,
    TERMINAL_CHANNEL,
    VERIFY_KEY,
    Batch,
    JobRecord,
    Status,
    fields_to_hash,
    job_key,
    utcnow,
)
from worker.durability import DurableWrites, NotDurable
from worker.settings import Settings


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
class Write:
    """One status change (a TRANSITION script call), prepared by `JobStore.transition_write`."""

    keys: list[Any]
    args: list[Any]


# How a job writes its status changes: `JobStore.transition`, or a worker's
# dispatcher, which sends them with its next take (`worker.dispatch`).
WriteTransition = Callable[..., Awaitable[Transition]]


@dataclass(frozen=True)
class Claim:
    outcome: Literal["claimed", "blocked", "skip", "gone"]
    blocked_on: str | None = None


class TakeNotConfirmed(Exception):
    """A take's claims were made but not stored at the durability level in time:
    no Prefect call may follow them (see `worker.job.give_back`)."""

    def __init__(self, cause: NotDurable, took: Took) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.took = took


@dataclass(frozen=True)
class Taken:
    """A job a worker took from the queue: claimed (its call is due now, or once a call
    slot frees: `worker.dispatch`), or held for the worker to settle an earlier try
    first (see `worker.lua.TAKE`)."""

    record: JobRecord
    claimed: bool


@dataclass(frozen=True)
class Took:
    """What `JobStore.take` did: the jobs taken, and each write's result (or error)."""

    taken: list[Taken]
    written: list[Transition | Exception]
    failed: Exception | None = None  # TAKE's own error: the writes were made, nothing taken
    # Fewer were due than asked for: seconds until the next job is due (None: no job
    # is queued, or every slot was filled).
    next_due_s: float | None = None


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
        gate_recheck_s: float = 5.0,
        quota: ClientQuota = ClientQuota(),
        queue_name: str = QUEUE_KEY,
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
        self.gate_recheck_ms = int(gate_recheck_s * 1000)
        self.quota = quota
        self.queue_name = queue_name
        self._enqueue = redis.register_script(lua.ENQUEUE)
        self._claim = redis.register_script(lua.CLAIM)
        self._take = redis.register_script(lua.TAKE)
        self._due = redis.register_script(lua.DUE)
        self._transition = redis.register_script(lua.TRANSITION)
        self._progress = redis.register_script(lua.PROGRESS)
        self._sweep = redis.register_script(lua.SWEEP)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> JobStore:
        """The store as the frontends and the workers both use it: one gate, one quota."""
        return cls(
            redis,
            result_ttl_s=settings.result_ttl_s,
            job_deadline_s=settings.job_deadline_s,
            max_queue_depth=settings.max_queue_depth,
            gate_grace_s=settings.job_timeout_s,
            gate_recheck_s=settings.gate_recheck_s,
            recent_jobs=settings.recent_jobs,
            durability=settings.durable_writes(),
            quota=ClientQuota(
                max_pending=settings.client_max_pending,
                max_rps=settings.client_max_rps,
                burst=settings.client_burst,
            ),
        )

    @property
    def pending_ttl_ms(self) -> int:
        """TTL of a record that is not terminal yet: outlives its deadline, then expires."""
        return int((self.job_deadline_s + self.result_ttl_s) * 1000)

    async def enqueue(self, record: JobRecord) -> Enqueued:
        return (await self.enqueue_many([record]))[0]

    async def enqueue_many(self, records: Sequence[JobRecord]) -> list[Enqueued]:
        """Store records and their queue entries in one atomic round trip, in order.

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
                self.gate_grace_ms,
                RUN_KEY_PREFIX,
                IDEMPOTENCY_KEY_PREFIX,
                quota.max_pending or 0,
                interval_ms,
                interval_ms * quota.burst,
                self.recent_jobs,
                self.gate_recheck_ms,
                ENQUEUED_CHANNEL,
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
            [job_key(job_id), INFLIGHT_KEY, self.queue_name],
            [
                JOB_KEY_PREFIX,
                self.gate_grace_ms,
                " ".join(s.value for s in allowed),
                recheck_at.isoformat(),
                STATUS_CHANNEL,
                job_id,
                self.pending_ttl_ms,
                max(int((recheck_at - utcnow()).total_seconds() * 1000), 0),
                *_flatten(encoded),
            ],
        )
        outcome = _text(reply[0])
        if outcome == "blocked":
            return Claim("blocked", _text(reply[1]))
        if outcome in ("claimed", "skip", "gone"):
            return Claim(outcome)  # type: ignore[arg-type]
        raise RuntimeError(f"unexpected claim reply {reply!r}")

    async def take(self, n: int, *, lease_s: float, writes: Sequence[Write] = ()) -> Took:
        """Write `writes` (status changes, in order), then take up to `n` due jobs: claim
        those whose call is due, hold the uncertain.

        One round trip for all of it (see `worker.lua.TAKE`): a worker writes the
        outcomes of the calls that came back with the take that refills their slots.
        Returns once the claims are stored at the durability level (NotDurable if
        not in time): a claim lost after Prefect had the change would let it be
        applied twice.
        """
        now = utcnow()
        recheck_at = now + timedelta(milliseconds=self.gate_recheck_ms)
        calls = [(self._transition, write.keys, write.args) for write in writes]
        if n > 0:
            take_args = [
                JOB_KEY_PREFIX,
                n,
                int(lease_s * 1000),
                self.gate_grace_ms,
                self.gate_recheck_ms,
                now.isoformat(),
                recheck_at.isoformat(),
                STATUS_CHANNEL,
            ]
            calls.append((self._take, [self.queue_name], take_args))
        try:
            replies = await self.durability.run_all(self.redis, calls, confirm=n > 0)
        except NotDurable as exc:
            if exc.reply is None:
                raise
            raise TakeNotConfirmed(exc, _took(exc.reply, len(writes), now)) from exc
        return _took(replies, len(writes), now)

    async def renew(self, job_ids: Sequence[str], *, lease_s: float) -> None:
        """Extend the leases of the jobs this worker holds (one round trip for all)."""
        if job_ids:
            await self._due(keys=[self.queue_name], args=[int(lease_s * 1000), "GT", *job_ids])

    async def requeue(self, job_id: str, *, delay_s: float) -> None:
        """Make a held job due again in `delay_s`, if it is still queued."""
        await self._due(keys=[self.queue_name], args=[max(int(delay_s * 1000), 0), "", job_id])

    def transition_write(
        self,
        job_id: str,
        *,
        allowed: Iterable[Status],
        status: Status,
        set_fields: dict[str, Any] | None = None,
        clear_fields: Iterable[str] = (),
        due_in_s: float | None = None,
        verify_at: datetime | None = None,
    ) -> Write:
        """A status change, ready to send alone (`transition`) or with a take (`take`).

        It moves the job to `status` if it is currently in one of `allowed`. A terminal
        status leaves the queue, gets the result TTL, wakes long-pollers and wakes the
        next change to the same run if it is parked behind this one. `due_in_s`
        requeues a job that goes on waiting (in the same step, so a wake-up from its
        blocker cannot come between); `verify_at` queues an applied job for a
        duplicate check.
        """
        terminal = status.is_terminal
        encoded = fields_to_hash({"status": status.value, **(set_fields or {})})
        clear = list(clear_fields)
        return Write(
            keys=[job_key(job_id), self.queue_name, FAILURES_KEY, INFLIGHT_KEY, VERIFY_KEY],
            args=[
                JOB_KEY_PREFIX,
                CLIENT_KEY_PREFIX,
                " ".join(s.value for s in allowed),
                self.result_ttl_s * 1000 if terminal else 0,
                TERMINAL_CHANNEL if terminal else STATUS_CHANNEL,
                job_id,
                self.recent_jobs,
                -1 if due_in_s is None else max(int(due_in_s * 1000), 0),
                int(verify_at.timestamp() * 1000) if verify_at else 0,
                len(clear),
                *clear,
                *_flatten(encoded),
            ],
        )

    async def transition(self, job_id: str, **change: Any) -> Transition:
        """Write one status change now (see `transition_write` for its arguments)."""
        write = self.transition_write(job_id, **change)
        return _transition(await self._transition(keys=write.keys, args=write.args))

    async def sweep(self, *, claimed_before: datetime, limit: int = 500) -> list[str]:
        """Requeue jobs last seen before `claimed_before` that are pending but in no queue.

        A Redis failover can roll back a queue entry but not its record (or the
        reverse), and a bug could drop one; both are rare, and this makes them harmless.
        """
        candidates = await self.redis.zrangebyscore(
            INFLIGHT_KEY, "-inf", int(claimed_before.timestamp() * 1000), start=0, num=limit
        )
        if not candidates:
            return []
        requeued = await self._sweep(
            keys=[self.queue_name, INFLIGHT_KEY],
            args=[JOB_KEY_PREFIX, *(_text(raw) for raw in candidates)],
        )
        return [_text(job_id) for job_id in requeued]

    async def due_verifications(self, *, limit: int = 100) -> list[str]:
        """Applied jobs whose duplicate check is due."""
        now_ms = int(utcnow().timestamp() * 1000)
        ids = await self.redis.zrangebyscore(VERIFY_KEY, "-inf", now_ms, start=0, num=limit)
        return [_text(job_id) for job_id in ids]

    async def verified(self, job_id: str, duplicates: int | None) -> None:
        """Record the duplicate check's finding (None: the record is gone) and dequeue it."""
        if duplicates:
            await self.redis.hincrby(STATS_KEY, "duplicated", 1)  # type: ignore[misc]
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
    queue_rank: int  # jobs ahead in the queue; -1 when not queued


class RateLimiter:
    """One budget of Prefect calls per second shared by every worker process."""

    def __init__(self, redis: Redis, max_rps: float, *, burst: int = 1) -> None:
        self.interval_ms = max(1, round(1000 / max_rps))
        self.burst_ms = (burst - 1) * self.interval_ms
        self._script = redis.register_script(lua.RATE_LIMIT)

    async def book(self, longest_wait_s: float) -> tuple[bool, float]:
        """Book a call's turn if it comes within `longest_wait_s`: (True, seconds until
        it); else (False, seconds until a turn would come), and nothing is booked."""
        booked, wait_ms = await self._script(
            keys=[RATE_LIMIT_KEY],
            args=[self.interval_ms, self.burst_ms, round(longest_wait_s * 1000)],
        )
        return bool(booked), int(wait_ms) / 1000


def _transition(reply: list[Any]) -> Transition:
    current = _text(reply[1])
    return Transition(applied=bool(reply[0]), status=Status(current) if current else None)


def _took(replies: list[Any], writes: int, now: datetime) -> Took:
    """A take's replies: the writes' first (an error in place of a failed one), then TAKE's."""
    written: list[Transition | Exception] = [
        reply if isinstance(reply, Exception) else _transition(reply) for reply in replies[:writes]
    ]
    if len(replies) <= writes:
        return Took([], written)
    if isinstance(replies[writes], Exception):
        return Took([], written, failed=replies[writes])
    taken, next_due_s = _taken(replies[writes], now)
    return Took(taken, written, next_due_s=next_due_s)


def _taken(reply: list[Any], now: datetime) -> tuple[list[Taken], float | None]:
    """TAKE's reply as records (a claimed one says what the script wrote), and when the
    next job is due if fewer than asked for were due now."""
    taken: list[Taken] = []
    next_due_s = None
    for kind, flat in zip(reply[::2], reply[1::2], strict=True):
        if _text(kind) == "next":
            next_due_s = int(flat) / 1000 if int(flat) >= 0 else None
            continue
        fields = {_text(k): _text(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
        claimed = _text(kind) == "claimed"
        if claimed:
            fields["status"] = Status.RUNNING.value
            fields["attempt_started_at"] = now.isoformat()
            fields.setdefault("started_at", now.isoformat())
            fields.pop("blocked_on", None)
            fields.pop("next_attempt_at", None)
        taken.append(Taken(JobRecord.from_hash(fields), claimed))
    return taken, next_due_s


def _item(record: JobRecord) -> dict[str, Any]:
    fields = record.to_hash()
    fields.pop("seq", None)
    return {
        "id": record.job_id,
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
