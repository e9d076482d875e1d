"""Enqueue, status and cancel against Redis: everything the tools do, minus MCP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from mcp_frontend.waiters import TerminalWaiters
from worker.contract import (
    PENDING_STATUSES,
    JobRecord,
    JobStatus,
    JobTicket,
    StateChange,
    Status,
    utcnow,
)
from worker.store import JobStore

log = logging.getLogger(__name__)


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
        """All statuses in input order, read in one round trip.

        An unknown id fails the call, and so does another client's: it answers
        exactly like an unknown one, so ids reveal nothing across clients.
        """
        records = await self.store.load_many(job_ids)
        statuses: list[JobStatus] = []
        for job_id, record in zip(job_ids, records, strict=True):
            if record is None or record.client_id != client_id:
                raise JobNotFound(job_id)
            statuses.append(JobStatus.of(record))
        return statuses

    async def wait(self, job_id: str, wait_s: float, client_id: str) -> JobStatus:
        """The job's status once terminal, or when `wait_s` (capped) runs out."""
        deadline = time.monotonic() + min(max(wait_s, 0.0), self.max_wait_s)
        async with self.waiters.watch(job_id) as terminal:
            while True:
                status = await self.get(job_id, client_id)
                remaining = deadline - time.monotonic()
                if status.status.is_terminal or remaining <= 0:
                    return status
                try:
                    await asyncio.wait_for(terminal.wait(), remaining)
                except TimeoutError:
                    pass
                terminal.clear()

    async def cancel(self, job_id: str, client_id: str) -> JobStatus:
        await self.get(job_id, client_id)  # ownership first: a foreign job is unknown
        moved = await self.store.transition(
            job_id,
            allowed=PENDING_STATUSES,
            status=Status.CANCELLED,
            set_fields={"finished_at": utcnow()},
            clear_fields=("next_attempt_at",),
        )
        if moved.status is None:
            raise JobNotFound(job_id)
        status = await self.get(job_id, client_id)
        if not moved.applied and status.status is not Status.CANCELLED:
            raise NotCancellable(status)
        return status
