"""Enqueue, status and cancel against Redis: everything the tools do, minus MCP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from pydantic import BaseModel

from mcp_frontend.progress import DrainGauge
from mcp_frontend.waiters import TerminalWaiters
from worker.contract import (
    PENDING_STATUSES,
    Batch,
    JobRecord,
    JobStatus,
    JobTicket,
    StateChange,
    Status,
    new_batch_id,
    utcnow,
)
from worker.store import JobStore, Transition

log = logging.getLogger(__name__)


class JobList(BaseModel):
    jobs: list[JobStatus]


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

    async def records(self, job_ids: Sequence[str], client_id: str) -> list[JobRecord]:
        """All records in input order, read in one round trip.

        An unknown id fails the call, and so does another client's: it answers
        exactly like an unknown one, so ids reveal nothing across clients.
        """
        records = await self.store.load_many(job_ids)
        owned: list[JobRecord] = []
        for job_id, record in zip(job_ids, records, strict=True):
            if record is None or record.client_id != client_id:
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
