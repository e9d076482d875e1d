"""The arq worker: its settings, its resources, its background tasks and restart loop.

The job itself is `worker.job.apply_state_change`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from typing import Any

import httpx
from arq.worker import Worker, func
from prefect.client.orchestration import get_client
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from worker import heartbeat, sweeper
from worker.applier import PrefectApplier, without_connect_retries
from worker.concurrency import AdaptiveLimit, LimitSettings
from worker.contract import (
    APPLY_STATE_CHANGE,
    WORKER_KEY_PREFIX,
    json_deserializer,
    json_serializer,
)
from worker.job import after_job_end, apply_state_change
from worker.redis_conn import arq_pool
from worker.settings import Settings
from worker.store import JobStore, RateLimiter

log = logging.getLogger(__name__)

# Retries are ours (deadline and attempt budget); arq's counter only has to not get in the way.
_ARQ_MAX_TRIES = 1_000_000
_SPARE_JOBS = 6  # jobs a worker holds beyond its Prefect call slots: a poll interval's worth
# After losing Redis: wait 0.5 s, doubling to 10 s while it stays away; a run that
# lasted this long was a recovery, and the next loss starts from 0.5 s again.
_FIRST_RESTART_DELAY_S = 0.5
_STEADY_RUN_S = 30.0


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    # One Prefect client per process, reused by every job. Its retries are bypassed
    # (see PrefectApplier._send): the queue retries, visibly.
    client = get_client(httpx_settings={"timeout": httpx.Timeout(settings.prefect_timeout_s)})
    ctx["prefect"] = without_connect_retries(await client.__aenter__())
    redis = ctx["redis"]  # arq's own pool: one Redis connection pool per process
    limiter = RateLimiter(redis, settings.prefect_max_rps) if settings.prefect_max_rps else None
    arq_worker: Worker = ctx["arq_worker"]

    def take_fewer_jobs(slots: int) -> None:
        # arq takes jobs up to max_jobs (read on every poll). Jobs it holds beyond our
        # slots only wait, and every worker's poll walks past them with a round trip
        # each: so it takes what the slots can serve soon, and leaves the rest queued.
        arq_worker.max_jobs = min(settings.worker_concurrency, slots + _SPARE_JOBS)

    ctx["concurrency"] = AdaptiveLimit(
        LimitSettings(
            maximum=settings.worker_concurrency,
            adaptive=settings.prefect_adaptive,
            latency_tolerance=settings.prefect_latency_tolerance,
            latency_floor_s=settings.prefect_latency_floor_s,
        ),
        on_change=take_fewer_jobs,
    )
    take_fewer_jobs(int(ctx["concurrency"].limit))
    ctx["applier"] = PrefectApplier(
        ctx["prefect"], limiter, ctx["concurrency"], call_timeout_s=settings.prefect_timeout_s
    )
    ctx["store"] = JobStore(
        redis,
        result_ttl_s=settings.result_ttl_s,
        job_deadline_s=settings.job_deadline_s,
        max_queue_depth=settings.max_queue_depth,
        gate_grace_s=settings.job_timeout_s,
        recent_jobs=settings.recent_jobs,
        durability=settings.durable_writes(),
    )

    ctx["heartbeat"] = asyncio.create_task(heartbeat.beat(ctx))
    ctx["sweeper"] = asyncio.create_task(sweeper.sweep(ctx))


async def shutdown(ctx: dict[str, Any]) -> None:
    for name in ("sweeper", "heartbeat"):
        if name in ctx:
            ctx[name].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ctx[name]
    if "heartbeat" in ctx:
        with contextlib.suppress(RedisError):
            await ctx["redis"].delete(WORKER_KEY_PREFIX + heartbeat.worker_id())
    if "prefect" in ctx:
        await ctx["prefect"].__aexit__(None, None, None)


def build_worker(settings: Settings, **overrides: Any) -> Worker:
    """An arq Worker wired to this project's settings, JSON serializer and hooks."""
    options: dict[str, Any] = {
        "functions": [
            func(
                apply_state_change,
                name=APPLY_STATE_CHANGE,
                timeout=settings.arq_job_timeout_s,
                max_tries=_ARQ_MAX_TRIES,
                keep_result=0,
            )
        ],
        "redis_pool": arq_pool(settings),
        "job_serializer": json_serializer,
        "job_deserializer": json_deserializer,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "after_job_end": after_job_end,
        "ctx": {"settings": settings},
        "max_jobs": settings.worker_concurrency,
        # Running jobs stay at the head of arq's queue and every worker reads past
        # them; arq's default (5 x max_jobs) stalls a fleet of several workers.
        "queue_read_limit": max(500, 10 * settings.worker_concurrency),
        "poll_delay": settings.worker_poll_delay_s,
        "keep_result": 0,
        "handle_signals": True,
        # SIGTERM (`docker stop`): take no new job, let the running ones finish (each is
        # bounded by the job timeout), then stop; compose's stop_grace_period is longer.
        "job_completion_wait": math.ceil(settings.job_timeout_s),
    }
    options.update(overrides)
    worker = Worker(**options)
    worker.ctx["arq_worker"] = worker  # startup() ties max_jobs to the adaptive limit
    # arq derives this from the longest job timeout; the lease (see _lease) replaces it.
    worker.in_progress_timeout_s = settings.worker_lease_s
    return worker


async def _close_after_lost_redis(worker: Worker) -> None:
    """What arq's close() skips when Redis is gone: it stops at its first Redis call,
    before on_shutdown, and this run's heartbeat would live on in the event loop the
    next run shares. Its jobs end first: they use this run's Prefect client."""
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    await shutdown(worker.ctx)
    # Its sockets may be frozen (a partition): the next run starts a pool of its own.
    # (arq's close() may have dropped its reference already; ctx keeps one.)
    pool = worker.ctx.get("redis")
    if pool is not None:
        await pool.aclose(close_connection_pool=True)


def run_worker(settings: Settings) -> None:
    """Run a worker until SIGINT/SIGTERM, starting over if Redis goes away.

    arq's poll loop ends on a Redis error; its jobs are safe (their leases
    lapse and they run again), so the worker waits for Redis and carries on.
    """
    if settings.worker_metrics_port is not None:
        # Once per process, not per run below: the registry is process-wide, and a
        # second bind would fail with "Address already in use" after every restart.
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host)
    delay_s = _FIRST_RESTART_DELAY_S
    while True:
        worker = build_worker(settings)
        started = time.monotonic()
        try:
            worker.run()
            return
        except (RedisError, ConnectionError, socket.gaierror, TimeoutError) as exc:
            # Only what losing Redis raises: any other error (a bug, a bad setting)
            # must stop the process loudly rather than loop.
            if time.monotonic() - started > _STEADY_RUN_S:
                delay_s = _FIRST_RESTART_DELAY_S  # a new outage, not the same one going on
            log.warning("lost Redis (%s); starting over in %.1f s", exc, delay_s)
            with contextlib.suppress(RedisError, OSError):
                worker.loop.run_until_complete(_close_after_lost_redis(worker))
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 10.0)
