"""What a job is doing, in words a person reads, and how often to ask again.

Used by MCP tasks (`statusMessage`, `pollIntervalMs`) and by `get_job`'s
progress notifications. Everything here is read from Redis, so any frontend
replica tells the same story.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from redis.asyncio import Redis

from worker.contract import ErrorCode, JobRecord, Status
from worker.fleet_stats import STATS_KEY, FleetCounts
from worker.store import Progress

MIN_POLL_S = 0.25
MAX_POLL_S = 3.0
UNKNOWN_DUE_S = 3.0  # no recent rate to go by: ask again in about a second
STALE_S = 10.0  # a rate measured over a longer gap says little about now


@dataclass(frozen=True)
class Drain:
    jobs_per_s: float | None  # jobs the fleet finished per second lately; None: unknown
    queued: int  # jobs waiting for a worker right now


class DrainGauge:
    """The fleet's recent finish rate, from the counters the scripts keep in Redis.

    Sampled at most once per `every_s` per process, so asking costs callers
    nothing most of the time.
    """

    def __init__(self, redis: Redis, *, every_s: float = 1.0) -> None:
        self._redis = redis
        self._every_s = every_s
        self._last: tuple[float, int] | None = None  # (monotonic time, finished total)
        self._drain = Drain(None, 0)

    async def read(self) -> Drain:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self._every_s:
            return self._drain
        counts = FleetCounts.from_hash(await self._redis.hgetall(STATS_KEY))  # type: ignore[misc]
        finished, queued = counts.finished, counts.live["queued"]
        rate = None
        if self._last is not None and now - self._last[0] <= STALE_S:
            rate = max(0.0, finished - self._last[1]) / (now - self._last[0])
        self._last = (now, finished)
        self._drain = Drain(rate, max(0, queued))
        return self._drain


def poll_interval_ms(
    drain: Drain, *, jobs_ahead: int, next_attempt_in_s: float | None = None
) -> int:
    """Ask again about a third of the way to when the answer is due, within 0.25-3 s.

    A job deferred to a known time is due then; otherwise it is due when the
    fleet, at its recent rate, has finished the jobs ahead of it. A third keeps
    the wait after the answer short (B5 in the README) at two or three polls.
    """
    if next_attempt_in_s is not None and next_attempt_in_s > 0:
        due_s = next_attempt_in_s
    elif jobs_ahead == 0:
        due_s = 0.0  # next in line: a worker takes it at once
    elif drain.jobs_per_s is None:
        due_s = UNKNOWN_DUE_S
    elif drain.jobs_per_s > 0:
        due_s = (jobs_ahead + 1) / drain.jobs_per_s
    else:
        due_s = 3 * MAX_POLL_S  # nothing finished lately: workers busy or gone
    return round(min(max(due_s / 3, MIN_POLL_S), MAX_POLL_S) * 1000)


def describe(record: JobRecord, progress: Progress | None, now: datetime) -> str:
    """One line on where the job stands, e.g. "waiting: Prefect answered 503, attempt 3, ..."."""
    status = record.status
    if status is Status.QUEUED:
        if progress is not None and progress.queue_rank > 0:
            return f"queued: {_count(progress.queue_rank, 'change')} ahead in the queue"
        return "queued: next in line for a worker"
    if status is Status.RUNNING:
        return f"running: attempt {record.attempts + 1} is with Prefect"
    if status is Status.WAITING:
        return "waiting: " + _waiting_reason(record, progress, now)
    if status is Status.APPLIED:
        state = record.orchestration.state_type if record.orchestration else record.state.value
        return f"applied: the {record.run_type.value} run is now {state}"
    if status is Status.REJECTED:
        reason = record.orchestration.reason if record.orchestration else None
        verdict = record.orchestration.status if record.orchestration else "REJECT"
        return f"rejected: Prefect answered {verdict}" + (f": {reason}" if reason else "")
    if status is Status.FAILED:
        error = record.error
        return "failed: " + (f"{error.code.value}: {error.message}" if error else "no reason given")
    return "cancelled: it was never sent to Prefect"


def failure_reason(record: JobRecord) -> str | None:
    """Why a job was not applied: its error, or Prefect's verdict; None if neither."""
    if record.error is not None:
        return f"{record.error.code.value}: {record.error.message}"
    if record.orchestration is not None and record.status is not Status.APPLIED:
        reason = record.orchestration.reason
        return f"Prefect answered {record.orchestration.status}" + (f": {reason}" if reason else "")
    return None


def _waiting_reason(record: JobRecord, progress: Progress | None, now: datetime) -> str:
    if record.blocked_on:
        if progress is not None and progress.ahead_in_run > 0:
            more = "+" if progress.capped else ""
            return f"behind {progress.ahead_in_run}{more} earlier " + (
                "change to this run" if progress.ahead_in_run == 1 else "changes to this run"
            )
        return "behind an earlier change to this run"
    if record.ambiguous and not (record.error and record.error.code is ErrorCode.TRANSIENT):
        reason = "an earlier try may have reached Prefect; checking its history before retrying"
    elif record.error and record.error.code is ErrorCode.TRANSIENT:
        message = record.error.message
        if not message.startswith("Prefect"):
            message = "the call to Prefect failed: " + message  # a transport error
        reason = f"{_short(message)}, attempt {record.attempts}"
    elif record.orchestration and record.orchestration.status == "WAIT":
        reason = "Prefect asked to wait"
    else:
        reason = "the shared Prefect rate limit"
    if record.next_attempt_at is not None:
        seconds = (record.next_attempt_at - now).total_seconds()
        reason += f", next try in {seconds:.1f} s" if seconds > 0 else ", next try due now"
    return reason


def _short(message: str, limit: int = 120) -> str:
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
