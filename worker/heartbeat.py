"""A worker's heartbeat: one Redis hash per live process, read by /readyz and health checks."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import statistics
import time
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from worker.applier import PrefectApplier
from worker.contract import WORKER_KEY_PREFIX
from worker.settings import Settings

log = logging.getLogger(__name__)


async def beat(ctx: dict[str, Any]) -> None:
    """Say every `heartbeat_s` that this worker lives and whether Prefect answers it.

    Prefect's state comes from the jobs' own calls; only an idle worker probes
    /health, so the heartbeat adds no load to a busy Prefect.
    """
    settings: Settings = ctx["settings"]
    applier: PrefectApplier = ctx["applier"]
    redis: ArqRedis = ctx["redis"]
    key = WORKER_KEY_PREFIX + worker_id()
    while True:
        await _record(redis, key, applier, settings.heartbeat_s)
        stale = applier.last_answer_at is None or (
            time.monotonic() - applier.last_answer_at > 6 * settings.heartbeat_s
        )
        if stale:
            # Bounded to half a beat (plus a second), so a Prefect that never answers
            # cannot make this worker look dead (the key lives three beats).
            was_ok = applier.prefect_ok
            if await applier.probe(timeout_s=settings.heartbeat_s / 2) != was_ok:
                await _record(redis, key, applier, settings.heartbeat_s)  # say it now
        await asyncio.sleep(settings.heartbeat_s)


async def _record(redis: ArqRedis, key: str, applier: PrefectApplier, heartbeat_s: float) -> None:
    try:
        async with redis.pipeline(transaction=True) as pipe:  # never a key without TTL
            pipe.hset(
                key,
                mapping={
                    "seen_ms": int(time.time() * 1000),
                    "prefect_ok": int(applier.prefect_ok),
                    "pid": os.getpid(),
                    # Median of its latest Prefect calls; -1 before the first.
                    "prefect_ms": round(statistics.median(applier.recent_latencies_s) * 1000)
                    if applier.recent_latencies_s
                    else -1,
                },
            )
            pipe.pexpire(key, int(3 * heartbeat_s * 1000))
            await pipe.execute()
    except RedisError:
        log.warning("heartbeat not recorded: Redis unavailable")


def worker_id() -> str:
    """This process, as named in its heartbeat key: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"
