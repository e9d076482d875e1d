"""The fleet's sweeper: requeue jobs that lost their queue entry, and look for changes
written twice."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import httpx
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from worker.applier import PrefectApplier
from worker.contract import SWEEPER_LOCK_KEY, utcnow
from worker.heartbeat import worker_id
from worker.settings import Settings
from worker.store import JobStore

log = logging.getLogger(__name__)


async def sweep(ctx: dict[str, Any]) -> None:
    """Every `sweep_interval_s`, one worker of the fleet requeues orphaned jobs and
    reads the histories due for a duplicate check."""
    settings: Settings = ctx["settings"]
    store: JobStore = ctx["store"]
    redis: ArqRedis = ctx["redis"]
    interval_ms = int(settings.sweep_interval_s * 1000)
    # A pending job is always in the queue (a held one too, due when its lease lapses);
    # one missing for this long lost its entry (a failover, say): nobody holds it.
    orphan_after = timedelta(seconds=settings.job_timeout_s + settings.worker_lease_s)
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            if not await redis.set(SWEEPER_LOCK_KEY, worker_id(), nx=True, px=interval_ms):
                continue
            for job_id in await store.sweep(claimed_before=utcnow() - orphan_after):
                log.warning("job %s: requeued; its queue entry was lost while pending", job_id)
            await _verify_due(store, ctx["applier"])
        except RedisError:
            log.warning("sweep skipped: Redis unavailable")


async def _verify_due(store: JobStore, applier: PrefectApplier) -> None:
    for job_id in await store.due_verifications():
        record = await store.load(job_id)
        if record is None:
            await store.verified(job_id, None)
            continue
        try:
            found = await applier.find_transitions(record)
        except (httpx.HTTPError, OSError):
            return  # Prefect is away: the next sweep tries again
        duplicates = max(len(found) - 1, 0)
        if duplicates:
            log.error(
                "job %s: its change is in the run's history %d times",
                job_id,
                len(found),
                extra={"job_id": job_id, "run_id": record.run_id, "duplicates": duplicates},
            )
        await store.verified(job_id, duplicates)
