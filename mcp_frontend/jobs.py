"""Enqueue, status and cancel against Redis: everything the tools do, minus MCP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio
from pydantic import BaseModel
from redis.asyncio import Redis

from mcp_frontend.progress import DrainGauge
from mcp_frontend.waiters import TerminalWaiters
from worker.contract import (
    PENDING_STATUSES,
    Batch,
    InvalidChange,
    JobRecord,
    JobStatus,
    JobTicket,
    StateChange,
    Status,
    new_batch_id,
    parse_run_id,
    utcnow,
)
from worker.redis_conn import close_redis, redis_client
from worker.settings import Settings
from worker.store import JobStore, Transition

log = logging.getLogger(__name__)


class JobList(BaseModel):
    jobs: list[JobStatus]


FAILURE_STATUSES = frozenset({Status.REJECTED, Status.FAILED})
# What a retry copies from the old job: the change itself, not its idempotency key
# (a repeated key would return the old job).
_CHANGE_FIELDS = {
    "run_type",
    "run_id",
    "state",
    "state_name",
    "message",
    "force",
    "scheduled_time",
    "pause_expiration_time",
    "pause_reschedule",
    "pause_key",
}
_PAGE = 500
MAX_LIST = 1_000
_AGO_RE = re.compile(r"^(\d{1,9})([smhd])\Z")
_UNIT_S = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}


@dataclass(frozen=True)
class JobQuery:
    """Filters for `JobService.list`; every one given must match."""

    statuses: frozenset[Status] = frozenset()
    run_id: str | None = None
    client_id: str | None = None
    since: datetime | None = None
    limit: int = 50

    @classmethod
    def parse(
        cls,
        *,
        statuses: Sequence[str] = (),
        run_id: str | None = None,
        client_id: str | None = None,
        since: str | None = None,
        limit: int = 50,
    ) -> JobQuery:
        """Filters from tool or command-line arguments; `InvalidChange` names the bad one."""
        try:
            wanted = frozenset(Status(s.strip().lower()) for s in statuses)
        except ValueError:
            allowed = ", ".join(Status)
            raise InvalidChange("status", f"must be one of {allowed}") from None
        if not 1 <= limit <= MAX_LIST:
            raise InvalidChange("limit", f"must be 1 to {MAX_LIST}, got {limit}")
        return cls(
            statuses=wanted,
            run_id=None if run_id is None else parse_run_id(run_id),
            client_id=client_id,
            since=None if since is None else parse_since(since),
            limit=limit,
        )

    def matches(self, record: JobRecord) -> bool:
        return (
            (not self.statuses or record.status in self.statuses)
            and (self.run_id is None or record.run_id == self.run_id)
            and (self.client_id is None or record.client_id == self.client_id)
        )


def parse_since(text: str) -> datetime:
    """ "90s", "15m", "2h", "1d" ago, or an ISO 8601 time (UTC unless it says otherwise)."""
    match = _AGO_RE.match(text.strip())
    if match:
        seconds = int(match[1]) * _UNIT_S[match[2]]
        return utcnow() - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidChange(
            "since", f"must be like 15m, 2h, 1d or an ISO 8601 time, got {text!r:.40}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class NotRetryable(Exception):
    """Only rejected or failed jobs can be submitted again."""

    def __init__(self, status: JobStatus) -> None:
        super().__init__(status.status)
        self.status = status


class JobNotFound(LookupError):
    """No record for this job id: never existed, or expired after its TTL."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class NotCancellable(Exception):
    """The job already started or finished; only queued or waiting jobs can be cancelled."""

    def __init__(self, status: JobStatus) -> None:
        super().__init__(status.status)
        self.status = status


def job_store(redis: Redis, settings: Settings) -> JobStore:
    return JobStore.from_settings(redis, settings)


@contextlib.asynccontextmanager
async def open_job_service(settings: Settings) -> AsyncIterator[JobService]:
    """A JobService on its own Redis connections, closed on exit."""
    redis = redis_client(settings)
    # The subscription idles for long stretches, so it gets no read timeout.
    events = redis_client(settings, read_timeout=False)
    waiters = TerminalWaiters(events, silence_s=settings.redis_timeout_s)
    try:
        yield JobService(job_store(redis, settings), waiters, max_wait_s=settings.max_wait_s)
    finally:
        # Shielded: a server shut down by cancellation must still close its sockets.
        with anyio.CancelScope(shield=True):
            await waiters.aclose()
            await close_redis(redis)
            await close_redis(events)


class JobService:
    def __init__(self, store: JobStore, waiters: TerminalWaiters, *, max_wait_s: float) -> None:
        self.store = store
        self.waiters = waiters
        self.max_wait_s = max_wait_s
        self.drain = DrainGauge(store.redis)

    async def submit(self, changes: Sequence[StateChange], client_id: str) -> list[JobTicket]:
        """Store `client_id`'s changes and queue them, in order, in one atomic step.

        Raises QueueFull or IdempotencyConflict, having written nothing.
        """
        now = utcnow()
        records = [
            JobRecord.new(
                change, enqueued_at=now, deadline_s=self.store.job_deadline_s, client_id=client_id
            )
            for change in changes
        ]
        enqueued = await self.store.enqueue_many(records)
        for entry in enqueued:
            log.info(
                "change accepted",
                extra={
                    "job_id": entry.record.job_id,
                    "run_type": entry.record.run_type.value,
                    "run_id": entry.record.run_id,
                    "client_id": client_id,
                    "state": entry.record.state.value,
                    "deduplicated": entry.deduplicated,
                },
            )
        return [JobTicket.of(e.record, deduplicated=e.deduplicated) for e in enqueued]

    async def get(self, job_id: str, client_id: str) -> JobStatus:
        return (await self.get_many([job_id], client_id))[0]

    async def get_many(self, job_ids: Sequence[str], client_id: str) -> list[JobStatus]:
        """All statuses in input order, read in one round trip."""
        return [JobStatus.of(record) for record in await self.records(job_ids, client_id)]

    async def records(self, job_ids: Sequence[str], client_id: str | None) -> list[JobRecord]:
        """All records in input order, read in one round trip.

        An unknown id fails the call, and so does another client's: it answers
        exactly like an unknown one, so ids reveal nothing across clients.
        `client_id` None is the operator (`pmq jobs`), who sees every client's jobs.
        """
        records = await self.store.load_many(job_ids)
        owned: list[JobRecord] = []
        for job_id, record in zip(job_ids, records, strict=True):
            if record is None or (client_id is not None and record.client_id != client_id):
                raise JobNotFound(job_id)
            owned.append(record)
        return owned

    async def wait(
        self,
        job_id: str,
        wait_s: float,
        client_id: str,
        on_change: Callable[[JobRecord], Awaitable[None]] | None = None,
    ) -> JobStatus:
        """The job's status once terminal, or when `wait_s` (capped) runs out.

        With `on_change`, it is called with the record each time the job is
        seen in a new status (the first time included) until it is terminal.
        """
        deadline = time.monotonic() + min(max(wait_s, 0.0), self.max_wait_s)
        seen: Status | None = None
        async with self.waiters.watch(job_id, changes=on_change is not None) as event:
            while True:
                (record,) = await self.records([job_id], client_id)
                remaining = deadline - time.monotonic()
                if record.status.is_terminal or remaining <= 0:
                    return JobStatus.of(record)
                if on_change is not None and record.status is not seen:
                    seen = record.status
                    await on_change(record)
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except TimeoutError:
                    pass
                event.clear()

    async def find(self, query: JobQuery) -> list[JobRecord]:
        """The newest jobs that match `query`, newest first, from the recent-jobs indexes.

        Reads the index a page at a time and the records behind each page in one
        round trip, until `query.limit` match or the index ends.
        """
        failures_only = bool(query.statuses) and query.statuses <= FAILURE_STATUSES
        since_ms = int(query.since.timestamp() * 1000) if query.since else None
        found: list[JobRecord] = []
        offset = 0
        while len(found) < query.limit:
            ids = await self.store.recent_ids(
                failures=failures_only, since_ms=since_ms, offset=offset, count=_PAGE
            )
            if not ids:
                break
            offset += len(ids)
            records = await self.store.load_many(ids)
            found.extend(r for r in records if r is not None and query.matches(r))
        return found[: query.limit]

    async def retry(self, job_ids: Sequence[str], client_id: str | None) -> list[JobTicket]:
        """Submit rejected or failed changes again, as new jobs that name the old ones.

        `client_id` None (the operator's CLI) may retry any client's jobs; each new
        job belongs to the old job's client. All or nothing, like a batch.
        """
        job_ids = list(dict.fromkeys(job_ids))
        by_client: dict[str, list[JobRecord]] = {}
        for job_id, record in zip(job_ids, await self.store.load_many(job_ids), strict=True):
            if record is None or (client_id is not None and record.client_id != client_id):
                raise JobNotFound(job_id)
            if record.status not in FAILURE_STATUSES:
                raise NotRetryable(JobStatus.of(record))
            by_client.setdefault(record.client_id, []).append(record)
        retried: dict[str, JobTicket] = {}
        for owner, olds in by_client.items():
            now = utcnow()
            fresh = [
                JobRecord.new(
                    StateChange.model_validate(old.model_dump(include=_CHANGE_FIELDS)),
                    enqueued_at=now,
                    deadline_s=self.store.job_deadline_s,
                    client_id=owner,
                    retry_of=old.job_id,
                )
                for old in olds
            ]
            enqueued = await self.store.enqueue_many(fresh)
            for old, entry in zip(olds, enqueued, strict=True):
                retried[old.job_id] = JobTicket.of(entry.record)
        return [retried[job_id] for job_id in job_ids]

    async def open_batch(self, job_ids: Sequence[str], client_id: str) -> Batch:
        """Record jobs queued together so that they can be followed as one task."""
        batch = Batch(
            batch_id=new_batch_id(), client_id=client_id, job_ids=list(job_ids), created_at=utcnow()
        )
        await self.store.save_batch(batch)
        return batch

    async def batch(self, batch_id: str, client_id: str) -> Batch:
        batch = await self.store.load_batch(batch_id)
        if batch is None or batch.client_id != client_id:
            raise JobNotFound(batch_id)
        return batch

    async def cancel(self, job_id: str, client_id: str) -> JobStatus:
        await self.get(job_id, client_id)  # ownership first: a foreign job is unknown
        moved = await self.cancel_if_pending(job_id)
        if moved.status is None:
            raise JobNotFound(job_id)
        status = await self.get(job_id, client_id)
        if not moved.applied and status.status is not Status.CANCELLED:
            raise NotCancellable(status)
        return status

    async def cancel_if_pending(self, job_id: str) -> Transition:
        """Cancel the job if no worker has it; the caller has checked who owns it."""
        return await self.store.transition(
            job_id,
            allowed=PENDING_STATUSES,
            status=Status.CANCELLED,
            set_fields={"finished_at": utcnow()},
            clear_fields=("next_attempt_at",),
        )
