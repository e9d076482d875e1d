"""/readyz and /metrics: what the fleet looks like, read from Redis at request time.

Neither needs a token, so neither says anything sensitive: no URLs, no ids,
only counts, ok/unreachable and a fixed phrase for why Redis failed.
"""

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from worker.contract import QUEUE_KEY, WORKER_KEY_PREFIX
from worker.fleet_stats import LIVE, STATS_KEY, FleetCounts
from worker.redis_check import failure_kind

# The pmq_jobs counter's events: enqueued, the outcomes, then the rest.
EVENTS = (
    "enqueued",
    "applied",
    "rejected",
    "failed",
    "cancelled",
    "retried",
    "swept",  # requeued by the sweeper after their queue entry was lost
    "duplicated",  # found in their run's history more than once
    "deduplicated",  # resent with an idempotency key: answered with the existing job
)


class FleetProbe:
    """Reads worker heartbeats and the job counters the scripts keep in Redis."""

    def __init__(self, redis: Redis, *, worker_max_age_s: float) -> None:
        self.redis = redis
        self.worker_max_age_ms = int(worker_max_age_s * 1000)

    async def workers(self, host: str | None = None) -> list[dict[str, int]]:
        """Heartbeats fresher than the max age: one per live worker process (on `host`)."""
        pattern = WORKER_KEY_PREFIX + (f"{host}-*" if host else "*")
        keys = [key async for key in self.redis.scan_iter(match=pattern)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, ["seen_ms", "prefect_ok", "prefect_ms"])
            rows = await pipe.execute()
        now_ms = time.time() * 1000
        return [
            # prefect_ms: median of its latest Prefect calls; -1 before the first.
            {"seen_ms": int(seen), "prefect_ok": int(ok or 0), "prefect_ms": int(ms or -1)}
            for seen, ok, ms in rows
            if seen is not None and now_ms - int(seen) <= self.worker_max_age_ms
        ]

    async def readyz(self, _: Request) -> JSONResponse:
        """Ready: Redis answers, a worker is alive, and a worker reaches Prefect."""
        try:
            await self.redis.ping()
            workers = await self.workers()
        except RedisError as exc:
            down = {
                "ready": False,
                "redis": "unreachable",
                "redis_error": failure_kind(exc),  # e.g. "TLS certificate verification failed"
                "workers": 0,
                "prefect": "unknown",
            }
            return JSONResponse(down, status_code=503)
        prefect = "ok" if any(w["prefect_ok"] for w in workers) else "unreachable"
        if not workers:
            prefect = "unknown"
        ready = bool(workers) and prefect == "ok"
        body: dict[str, Any] = {
            "ready": ready,
            "redis": "ok",
            "workers": len(workers),
            "prefect": prefect,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(self, _: Request) -> Response:
        """Prometheus text: fleet totals from Redis, then this process's own metrics."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(STATS_KEY)
                pipe.zcard(QUEUE_KEY)
                stats, depth = await pipe.execute()
            workers = await self.workers()
        except RedisError:
            return Response("redis unreachable\n", status_code=503)
        registry = CollectorRegistry(auto_describe=False)
        counts = FleetCounts.from_hash(stats)
        registry.register(_Snapshot(counts.totals, counts.live, int(depth), len(workers)))
        body = generate_latest(registry) + generate_latest(REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


class _Snapshot:
    """One scrape's worth of fleet figures, as Prometheus metric families."""

    def __init__(
        self, totals: dict[str, int], live: dict[str, int], depth: int, workers: int
    ) -> None:
        self.totals, self.live, self.depth, self.workers = totals, live, depth, workers

    def collect(self) -> Iterator[Metric]:
        jobs = CounterMetricFamily(
            "pmq_jobs",
            "Jobs enqueued, and jobs ending in each outcome, fleet-wide.",
            labels=["event"],
        )
        for name in EVENTS:
            jobs.add_metric([name], self.totals.get(name, 0))
        yield jobs
        live = GaugeMetricFamily(
            "pmq_jobs_live", "Jobs now queued, running or waiting.", labels=["status"]
        )
        for name in LIVE:
            live.add_metric([name], max(0, self.live.get(name, 0)))
        yield live
        yield GaugeMetricFamily(
            "pmq_queue_depth", "Entries in the queue (queued, waiting, running).", self.depth
        )
        yield GaugeMetricFamily(
            "pmq_workers_alive", "Worker processes with a fresh heartbeat.", self.workers
        )
