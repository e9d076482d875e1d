"""One look at the whole queue: what `pmq jobs watch` and `/dashboard` show.

Everything comes from Redis (the counters the scripts keep, worker heartbeats,
the recent-failures index), so any frontend or operator's shell sees the same
fleet. Rates are left to the viewer: two snapshots a few seconds apart give
applied/s, rejected/s and failed/s without any state here.
"""

from __future__ import annotations

import statistics
from datetime import datetime

from pydantic import BaseModel, Field

from mcp_frontend.health import FleetProbe
from mcp_frontend.jobs import FAILURE_STATUSES, JobQuery, JobService
from mcp_frontend.progress import failure_reason
from worker.contract import QUEUE_KEY, JobRecord, utcnow
from worker.fleet_stats import LIVE, STATS_KEY, TOTALS, FleetCounts


class Failure(BaseModel):
    job_id: str
    client_id: str
    status: str
    run_type: str
    run_id: str
    state: str
    finished_at: datetime | None
    reason: str


class FleetSnapshot(BaseModel):
    at: datetime
    queue_depth: int = Field(description="Entries in the queue (queued, waiting, running).")
    live: dict[str, int] = Field(description="Jobs now queued, running and waiting.")
    totals: dict[str, int] = Field(description="Jobs ever enqueued, applied, rejected, ...")
    workers_alive: int
    prefect_ms: float | None = Field(description="Median of the workers' latest Prefect calls.")
    failures: list[Failure] = Field(description="The newest rejected or failed jobs.")


async def snapshot(
    service: JobService, *, worker_max_age_s: float, failures: int = 10
) -> FleetSnapshot:
    redis = service.store.redis
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(STATS_KEY)
        pipe.zcard(QUEUE_KEY)
        stats, depth = await pipe.execute()
    counts = FleetCounts.from_hash(stats)
    beats = await FleetProbe(redis, worker_max_age_s=worker_max_age_s).workers()
    latencies = [beat["prefect_ms"] for beat in beats if beat["prefect_ms"] >= 0]
    recent = await service.find(JobQuery(statuses=FAILURE_STATUSES, limit=failures))
    return FleetSnapshot(
        at=utcnow(),
        queue_depth=int(depth),
        live={name: max(0, counts.live[name]) for name in LIVE},
        totals={name: counts.totals[name] for name in TOTALS},
        workers_alive=len(beats),
        prefect_ms=statistics.median(latencies) if latencies else None,
        failures=[_failure(record) for record in recent],
    )


def _failure(record: JobRecord) -> Failure:
    reason = failure_reason(record) or "no reason recorded"
    return Failure(
        job_id=record.job_id,
        client_id=record.client_id,
        status=record.status.value,
        run_type=record.run_type.value,
        run_id=record.run_id,
        state=record.state.value,
        finished_at=record.finished_at,
        reason=reason,
    )
