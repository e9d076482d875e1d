"""The worker process: arq's Worker with our dispatcher, its resources, its background
tasks and its restart loop.

How jobs are taken is `worker.dispatch`; the job itself is `worker.job.apply_state_change`.
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
from worker.applier import PrefectApplier
from worker.concurrency import AdaptiveLimit, LimitSettings
from worker.contract import (
    APPLY_STATE_CHANGE,
    QUEUE_KEY,
    WORKER_KEY_PREFIX,
    json_deserializer,
    json_serializer,
)
from worker.dispatch import Dispatcher, QueueWorker, Slot
from worker.durability import NotDurable
from worker.job import apply_state_change, give_back
from worker.prefect_http import PrefectHttp
from worker.redis_check import RedisUnusable, check_redis
from worker.redis_conn import arq_pool
from worker.settings import Settings
from worker.store import JobStore, RateLimiter, Taken

log = logging.getLogger(__name__)

_POLL_SPACING_S = 0.01

# After losing Redis: wait 0.5 s, doubling to 10 s while it stays away; a run that
# lasted this long was a recovery, and the next loss starts from 0.5 s again.
_FIRST_RESTART_DELAY_S = 0.5
_STEADY_RUN_S = 30.0
EXIT_REDIS_UNUSABLE = 2


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    # One Prefect client per process, reused by every job. Its retries are bypassed
    # (see PrefectApplier._send): the queue retries, visibly.
    client = get_client(httpx_settings={"timeout": httpx.Timeout(settings.prefect_timeout_s)})
    ctx["prefect"] = await client.__aenter__()
    # Every call in flight has its connection, and a few spare for the history reads.
    ctx["prefect_http"] = PrefectHttp(
        ctx["prefect"], max_connections=settings.worker_concurrency + 4
    )
    redis = ctx["redis"]  # arq's own pool: one Redis connection pool per process
    limiter = RateLimiter(redis, settings.prefect_max_rps) if settings.prefect_max_rps else None
    arq_worker: Worker = ctx["arq_worker"]

    def more_slots(_: int) -> None:
        dispatcher: Dispatcher | None = ctx.get("dispatcher")
        if dispatcher is not None:
            dispatcher.wake()

    ctx["concurrency"] = AdaptiveLimit(
        LimitSettings(
            maximum=settings.worker_concurrency,
            adaptive=settings.prefect_adaptive,
            latency_tolerance=settings.prefect_latency_tolerance,
            latency_floor_s=settings.prefect_latency_floor_s,
        ),
        on_change=more_slots,
    )
    ctx["applier"] = PrefectApplier(
        ctx["prefect_http"], limiter, ctx["concurrency"], call_timeout_s=settings.prefect_timeout_s
    )
    ctx["store"] = JobStore.from_settings(redis, settings)

    async def run(taken: Taken, slot: Slot | None) -> None:
        await apply_state_change(ctx, taken, slot)

    async def unconfirmed(taken: list[Taken], exc: NotDurable) -> None:
        await give_back(ctx["store"], taken, exc)

    ctx["dispatcher"] = Dispatcher(
        store=ctx["store"],
        concurrency=ctx["concurrency"],
        settings=settings,
        run=run,
        give_back=unconfirmed,
        tasks=arq_worker.tasks,
        may_take=lambda: arq_worker.allow_pick_jobs,
    )

    ctx["heartbeat"] = asyncio.create_task(heartbeat.beat(ctx))
    ctx["sweeper"] = asyncio.create_task(sweeper.sweep(ctx))
    ctx["work"] = asyncio.create_task(
        ctx["dispatcher"].listen_for_work(redis, silence_s=settings.redis_timeout_s)
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    if "dispatcher" in ctx:
        await ctx["dispatcher"].stop()
    for name in ("work", "sweeper", "heartbeat"):
        if name in ctx:
            ctx[name].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ctx[name]
    if "heartbeat" in ctx:
        with contextlib.suppress(RedisError):
            await ctx["redis"].delete(WORKER_KEY_PREFIX + heartbeat.worker_id())
    if "prefect_http" in ctx:
        await ctx["prefect_http"].aclose()
    if "prefect" in ctx:
        await ctx["prefect"].__aexit__(None, None, None)


def build_worker(settings: Settings, **overrides: Any) -> Worker:
    """arq's Worker wired to this project's dispatcher, settings and hooks."""
    options: dict[str, Any] = {
        # arq wants one; the dispatcher calls it (worker.dispatch), arq never does.
        "functions": [func(apply_state_change, name=APPLY_STATE_CHANGE)],
        "queue_name": QUEUE_KEY,  # arq only names its health-check key after it
        "redis_pool": arq_pool(settings),
        "job_serializer": json_serializer,
        "job_deserializer": json_deserializer,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "ctx": {"settings": settings},
        # Between polls, the dispatcher waits for work itself (Dispatcher.until_work):
        # this only spaces them when wake-ups come thick.
        "poll_delay": _POLL_SPACING_S,
        "handle_signals": True,
        # SIGTERM (`docker stop`): take no new job, let the running ones finish (each is
        # bounded by the job timeout), then stop; compose's stop_grace_period is longer.
        "job_completion_wait": math.ceil(settings.job_timeout_s),
    }
    options.update(overrides)
    worker = QueueWorker(**options)
    worker.ctx["arq_worker"] = worker  # startup() gives the dispatcher its task table
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
    A Redis it can never use (a wrong CA, a plaintext port behind rediss://, a
    wrong password: see worker.redis_check) ends the process instead, with exit
    code 2 and the reason logged.
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
            # Before arq's first command, which a plaintext port behind rediss:// would stall.
            worker.loop.run_until_complete(check_redis(settings))
            worker.run()
            return
        except RedisUnusable as exc:
            log.error("cannot use Redis, stopping: %s", exc)
            raise SystemExit(EXIT_REDIS_UNUSABLE) from None
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
