"""Named states and their details: Prefect's vocabulary, checked before anything is queued.

Prefect's named states (`prefect.states`) are a type plus a name, and some
carry details: `AwaitingRetry` is SCHEDULED with `scheduled_time`, `Suspended`
is PAUSED with `pause_reschedule`. A change may name one of them (matched
case-insensitively, stored in Prefect's spelling) or any custom name; a
well-known name must come with its own type.

Times are absolute (ISO 8601 with a zone) or relative to acceptance (`90s`,
`10m`, `2h`, `1d`), and stored as absolute UTC, so a change means the same
thing however long it waits in the queue.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from worker.contract import InvalidChange, StateType

# Prefect 3.9's constructors in `prefect.states`, and the names its engine writes.
WELL_KNOWN_NAMES: dict[str, StateType] = {
    "Scheduled": StateType.SCHEDULED,
    "Late": StateType.SCHEDULED,
    "AwaitingRetry": StateType.SCHEDULED,
    "AwaitingConcurrencySlot": StateType.SCHEDULED,
    "Pending": StateType.PENDING,
    "Submitting": StateType.PENDING,
    "InfrastructurePending": StateType.PENDING,
    "Running": StateType.RUNNING,
    "Retrying": StateType.RUNNING,
    "Completed": StateType.COMPLETED,
    "Cached": StateType.COMPLETED,
    "Failed": StateType.FAILED,
    "TimedOut": StateType.FAILED,
    "Cancelled": StateType.CANCELLED,
    "Crashed": StateType.CRASHED,
    "Paused": StateType.PAUSED,
    "Suspended": StateType.PAUSED,
    "Cancelling": StateType.CANCELLING,
}
_BY_FOLDED = {name.casefold(): name for name in WELL_KNOWN_NAMES}
# Prefect sets no limit; this one keeps a queued job's Redis hash compact
# (values under 64 bytes stay in Redis's listpack encoding).
MAX_NAME_CHARS = 64
NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]+\Z")  # printable: it is shown in Prefect's UI
_RELATIVE_RE = re.compile(r"^([0-9]{1,9})([smhd])\Z")  # ASCII digits only
_UNIT_S = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}
# Far enough for any real schedule; a typo like 10000d is caught.
MAX_AHEAD = timedelta(days=3_660)


def canonical_name(name: str, state: StateType) -> str:
    """`name` in Prefect's spelling if it is well known (and belongs to `state`)."""
    if not name.strip():
        raise InvalidChange("name", "must not be empty or blank")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidChange("name", f"must be at most {MAX_NAME_CHARS} characters, got {len(name)}")
    if not NAME_RE.match(name):
        raise InvalidChange("name", "must not contain control characters")
    known = _BY_FOLDED.get(name.strip().casefold())
    if known is None:
        return name
    if WELL_KNOWN_NAMES[known] is not state:
        raise InvalidChange(
            "name",
            f"{known!r} is a {WELL_KNOWN_NAMES[known]} state in Prefect, not {state}: "
            f"use state={WELL_KNOWN_NAMES[known]}",
        )
    return known


def parse_when(value: str, field: str, now: datetime) -> datetime:
    """An ISO 8601 time with a zone, or `90s` / `10m` / `2h` / `1d` from `now`; as UTC."""
    if not isinstance(value, str):
        raise InvalidChange(field, "must be an ISO 8601 time with a zone, or like 90s, 10m, 2h, 1d")
    relative = _RELATIVE_RE.match(value.strip())
    if relative:
        when = now + timedelta(seconds=int(relative[1]) * _UNIT_S[relative[2]])
    else:
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidChange(
                field,
                "must be an ISO 8601 time with a zone, or like 90s, 10m, 2h, 1d; "
                f"got {value!r:.40}",
            ) from None
        if when.tzinfo is None:
            raise InvalidChange(
                field, f"must carry a zone (e.g. Z or +02:00): {value!r:.40} could mean any time"
            )
    if when - now > MAX_AHEAD:
        raise InvalidChange(field, "must be within 10 years")
    return when.astimezone(UTC)


def pause_expiry(
    pause_timeout: float | None, pause_expiration_time: str | None, now: datetime
) -> datetime | None:
    """When a pause ends, from seconds or a time; Prefect fails a run resumed after it.

    A time already past is refused: Prefect would fail the run (“pause timed
    out”) at its next transition, which is never what the caller meant.
    """
    if pause_timeout is not None and pause_expiration_time is not None:
        raise InvalidChange(
            "pause_timeout", "give pause_timeout or pause_expiration_time, not both"
        )
    if pause_timeout is not None:
        if isinstance(pause_timeout, bool) or not isinstance(pause_timeout, int | float):
            raise InvalidChange("pause_timeout", "must be a number of seconds")
        if not 0 < pause_timeout <= MAX_AHEAD.total_seconds():
            raise InvalidChange("pause_timeout", "must be more than 0 seconds and within 10 years")
        return now + timedelta(seconds=pause_timeout)
    if pause_expiration_time is None:
        return None
    when = parse_when(pause_expiration_time, "pause_expiration_time", now)
    if when <= now:
        raise InvalidChange(
            "pause_expiration_time",
            "must be in the future: Prefect fails a run whose pause has already expired",
        )
    return when


def as_asked(asked: str | float | None, resolved: datetime | None) -> str | None:
    """A time for a change's identity: a relative one as written (a resend of `10m`
    a minute later is the same request), an absolute one in UTC."""
    if asked is None or resolved is None:
        return None
    if not isinstance(asked, str) or _RELATIVE_RE.match(asked.strip()):
        return f"in {asked}"
    return resolved.isoformat()
