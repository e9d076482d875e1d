"""When to try a job again: backoff with full jitter, Retry-After, deadlines."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

from worker.contract import utcnow


def backoff_s(failures: int, *, base_s: float, max_s: float, retry_after_s: float | None) -> float:
    """Delay before the next try after `failures` transient failures in a row.

    Full jitter (uniform in [0, min(max, base * 2^(n-1))]) spreads a fleet's
    retries so they do not hit a recovering Prefect in waves; a server's
    Retry-After is a floor, never shortened by the jitter.
    """
    ceiling = min(max_s, base_s * 2 ** max(failures - 1, 0))
    delay = random.uniform(0, ceiling)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - (now or utcnow())).total_seconds())


def deadline_of(enqueued_at: datetime, job_deadline_s: float) -> datetime:
    return enqueued_at + timedelta(seconds=job_deadline_s)
