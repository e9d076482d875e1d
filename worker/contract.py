"""What the frontend and the workers agree on: names, Redis keys, models, serializer.

The frontend imports this module; it never imports the frontend.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr, field_validator

# arq function name of the one job this project runs.
APPLY_STATE_CHANGE = "apply_state_change"

# Redis keys.
# Sorted set: job ids by when each is due (ms, Redis's clock). A job a worker holds
# is due when its lease lapses; see worker.lua.TAKE. No payload: the record is the job.
QUEUE_KEY = "pmq:queue"
# arq's Worker writes this after each poll (arq names it after the queue: see worker.app).
WORKER_POLLED_KEY = QUEUE_KEY + ":health-check"
JOB_KEY_PREFIX = "pmq:job:"
RUN_KEY_PREFIX = "pmq:run:"  # per run: `seq` counter and `last` job id
IDEMPOTENCY_KEY_PREFIX = "pmq:idem:"
CLIENT_KEY_PREFIX = "pmq:client:"  # per client: `<id>:pending` set, `<id>:rate` cell
RATE_LIMIT_KEY = "pmq:ratelimit:prefect"
# Hash: a counter per kind of status move ("queued>running"), and events; read
# through worker.fleet_stats. (It replaced pmq:stats:total and pmq:stats:live,
# which expire a week after their last write.)
STATS_KEY = "pmq:stats:moves"
WORKER_KEY_PREFIX = "pmq:worker:"  # one heartbeat hash per live worker process
# Who owns jobs created without a token: stdio, a loopback HTTP bind, `pmq jobs`.
LOCAL_CLIENT = "local"
TERMINAL_CHANNEL = "pmq:events:terminal"  # the id of each job that turned terminal
STATUS_CHANNEL = "pmq:events:status"  # the id of each job that changed to a non-terminal status
ENQUEUED_CHANNEL = "pmq:events:enqueued"  # how many new jobs an enqueue made: wakes idle workers
BATCH_KEY_PREFIX = "pmq:batch:"  # a batch submitted as one MCP task: its job ids
RECENT_KEY = "pmq:recent"  # sorted set: the newest job ids by enqueue time (ms)
FAILURES_KEY = "pmq:recent:failures"  # sorted set: rejected and failed job ids by finish time
# Sorted set: jobs not terminal yet, by last sign of life (enqueue, claim, sweep; ms).
# The sweeper finds here any job whose queue entry is gone while its record is pending.
INFLIGHT_KEY = "pmq:inflight"
# Sorted set: applied jobs whose run history is read once more for duplicates, by due time.
VERIFY_KEY = "pmq:verify"
SWEEPER_LOCK_KEY = "pmq:sweeper"  # one sweeper per interval across the fleet


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


def new_job_id() -> str:
    return uuid.uuid4().hex


def new_batch_id() -> str:
    # Its own prefix: a batch answers tasks/get, never get_job.
    return "batch-" + uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class RunType(StrEnum):
    TASK = "task"
    FLOW = "flow"


class StateType(StrEnum):
    """Prefect's state types, the values `state` accepts (case-insensitive)."""

    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    APPLIED = "applied"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({Status.APPLIED, Status.REJECTED, Status.FAILED, Status.CANCELLED})
# Statuses from which a job may still be claimed by a worker or cancelled by a caller.
PENDING_STATUSES = frozenset({Status.QUEUED, Status.WAITING})


class ErrorCode(StrEnum):
    RUN_NOT_FOUND = "run_not_found"
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    RETRIES_EXHAUSTED = "retries_exhausted"
    # Set while a job is `waiting` after a transient Prefect error; cleared when it ends.
    TRANSIENT = "transient_error"
    INTERNAL = "internal_error"


class Orchestration(BaseModel):
    """Prefect's answer to a set_state call."""

    status: str = Field(description="ACCEPT, REJECT, ABORT or WAIT.")
    state_type: str | None = Field(None, description="Type of the state the run now has.")
    state_name: str | None = Field(None, description="Name of the state the run now has.")
    scheduled_time: datetime | None = Field(
        None, description="When the run is scheduled, if its state is SCHEDULED."
    )
    reason: str | None = Field(None, description="Why Prefect rejected, aborted or delayed.")


class JobError(BaseModel):
    code: ErrorCode
    message: str


class InvalidChange(ValueError):
    """A state change that breaks a rule; `field` names the argument at fault."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def parse_run_id(run_id: str, field: str = "run_id") -> str:
    """A run id in Prefect's canonical form; `InvalidChange` naming `field` if it is not a UUID."""
    try:
        if not _UUID_TEXT_RE.match(run_id):
            raise ValueError(run_id)
        return str(uuid.UUID(run_id))
    except (ValueError, AttributeError, TypeError):
        raise InvalidChange(
            field,
            f"must be a UUID like 1b4e28ba-2fa1-11d2-883f-0016d3cca427, got {run_id!r:.60}",
        ) from None


IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")  # \Z: `$` allows a final newline

# A UUID's textual forms: hyphenated or 32 hex digits, optionally in braces or a URN.
# `uuid.UUID` alone also takes signs, underscores, blanks and non-ASCII digits, which
# can turn a mistyped id into another valid one.
_UUID_TEXT_RE = re.compile(
    r"^(?:urn:uuid:)?(\{)?(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{12}|[0-9a-fA-F]{32})(?(1)\})\Z"
)


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class StateChange(BaseModel):
    """One validated change, as the frontend accepted it."""

    run_type: RunType
    run_id: str
    state: StateType
    state_name: str | None = None
    message: str | None = None
    force: bool = False
    idempotency_key: str | None = None
    # State details (worker.state_details), absolute UTC times.
    scheduled_time: datetime | None = None
    pause_expiration_time: datetime | None = None
    pause_reschedule: bool = False
    pause_key: str | None = None
    # The times as asked (a relative `10m` stays so), for identity(); unset on records.
    _asked_times: list[str | None] | None = PrivateAttr(default=None)

    @classmethod
    def parse(
        cls,
        *,
        run_type: str,
        run_id: str,
        state: str,
        message: str | None,
        force: bool,
        idempotency_key: str | None,
        max_message_chars: int,
        run_id_field: str = "run_id",
        name: str | None = None,
        scheduled_time: str | None = None,
        pause_timeout: float | None = None,
        pause_expiration_time: str | None = None,
        pause_reschedule: bool | None = None,
        pause_key: str | None = None,
        now: datetime | None = None,
    ) -> StateChange:
        """Validate raw tool arguments; raise `InvalidChange` naming the field and rule.

        Relative times (`10m`) count from `now`, the moment of acceptance.
        """
        # Imported here: worker.state_details builds on this module's types.
        from worker.state_details import as_asked, canonical_name, parse_when, pause_expiry

        try:
            kind = RunType(run_type)
        except ValueError:
            raise InvalidChange("run_type", "must be 'task' or 'flow'") from None
        canonical_id = parse_run_id(run_id, run_id_field)
        try:
            state_type = StateType(state.strip().upper())
        except (ValueError, AttributeError):
            allowed = ", ".join(StateType)
            raise InvalidChange(
                "state", f"must be one of {allowed} (case-insensitive), got {state!r:.40}"
            ) from None
        if message is not None and len(message) > max_message_chars:
            raise InvalidChange(
                "message", f"must be at most {max_message_chars} characters, got {len(message)}"
            )
        if message is not None and not _is_unicode(message):
            # Redis's JSON decoder would refuse it, and the call would look like an outage.
            raise InvalidChange("message", "must be valid Unicode text (no lone surrogates)")
        if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.match(idempotency_key):
            raise InvalidChange(
                "idempotency_key",
                "must be 1-128 characters of letters, digits and . _ : -",
            )
        now = now or utcnow()
        state_name = canonical_name(name, state_type) if name is not None else None
        when = None
        if scheduled_time is not None:
            _only_for(state_type, StateType.SCHEDULED, "scheduled_time")
            when = parse_when(scheduled_time, "scheduled_time", now)
        pause_fields = {
            "pause_timeout": pause_timeout,
            "pause_expiration_time": pause_expiration_time,
            "pause_reschedule": pause_reschedule,
            "pause_key": pause_key,
        }
        for field, value in pause_fields.items():
            if value is not None:
                _only_for(state_type, StateType.PAUSED, field)
        if state_name == "Suspended" and pause_reschedule is False:
            raise InvalidChange(
                "pause_reschedule", "a Suspended run is always rescheduled (Prefect's meaning)"
            )
        if pause_key is not None and not (0 < len(pause_key) <= MAX_PAUSE_KEY_CHARS):
            raise InvalidChange("pause_key", f"must be 1-{MAX_PAUSE_KEY_CHARS} characters")
        change = cls(
            run_type=kind,
            run_id=canonical_id,
            state=state_type,
            state_name=state_name,
            message=message,
            force=force,
            idempotency_key=idempotency_key,
            scheduled_time=when,
            pause_expiration_time=pause_expiry(pause_timeout, pause_expiration_time, now),
            pause_reschedule=bool(pause_reschedule) or state_name == "Suspended",
            pause_key=pause_key,
        )
        change._asked_times = [
            as_asked(scheduled_time, change.scheduled_time),
            as_asked(pause_timeout or pause_expiration_time, change.pause_expiration_time),
        ]
        return change

    def identity(self) -> str:
        """What must match for a repeated idempotency key to count as the same change.

        A digest, not the fields: stored in every record, it stays under Redis'
        64-byte listpack limit, which keeps a pending record's hash compact.
        Times count as asked (`10m`), not as resolved: a resend of the same
        request a minute later is the same change, so its key finds the first job.
        """
        times = self._asked_times or [
            moment.isoformat() if moment else None
            for moment in (self.scheduled_time, self.pause_expiration_time)
        ]
        fields = [
            self.run_type,
            self.run_id,
            self.state,
            self.state_name,
            self.message,
            self.force,
            *times,
            self.pause_reschedule,
            self.pause_key,
        ]
        return hashlib.blake2b(json.dumps(fields).encode(), digest_size=16).hexdigest()


MAX_PAUSE_KEY_CHARS = 64  # like a state name: keeps the job's Redis hash compact


def _only_for(state: StateType, wanted: StateType, field: str) -> None:
    if state is not wanted:
        raise InvalidChange(field, f"applies only to state {wanted}, not {state}")


class JobRecord(StateChange):
    """The stored job: the accepted change plus its progress, one Redis hash per job
    (`pmq:job:<id>`).

    Scalars are stored as strings, nested models as JSON, `None` as an absent field.
    """

    job_id: str
    status: Status
    client_id: str = "local"  # who created it; only they can see or cancel it
    fingerprint: str = ""
    # Per-run acceptance order, and the neighbours in that order (see worker.lua).
    seq: int = 0
    prev_job_id: str | None = None
    next_job_id: str | None = None
    blocked_on: str | None = None
    deadline_ms: int = 0
    # Sent as state_details.transition_id: lets a re-run find its own transition.
    transition_id: str = ""
    attempts: int = 0
    transient_failures: int = 0
    # When the latest try began, and whether it ended without a definite answer.
    attempt_started_at: datetime | None = None
    ambiguous: bool = False
    enqueued_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    next_attempt_at: datetime | None = None
    orchestration: Orchestration | None = None
    error: JobError | None = None
    retry_of: str | None = None  # the rejected or failed job this one submits again
    duplicate_transitions: int | None = None

    @field_validator("orchestration", "error", mode="before")
    @classmethod
    def _decode_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value

    @field_validator("force", "ambiguous", "pause_reschedule", mode="before")
    @classmethod
    def _decode_bool(cls, value: Any) -> Any:
        return value in ("1", b"1", True) if isinstance(value, str | bytes) else value

    @classmethod
    def new(
        cls,
        change: StateChange,
        *,
        enqueued_at: datetime,
        deadline_s: float,
        client_id: str,
        retry_of: str | None = None,
    ) -> JobRecord:
        return cls(
            job_id=new_job_id(),
            retry_of=retry_of,
            client_id=client_id,
            status=Status.QUEUED,
            transition_id=str(uuid.uuid4()),
            fingerprint=change.identity(),
            enqueued_at=enqueued_at,
            deadline_ms=int((enqueued_at.timestamp() + deadline_s) * 1000),
            **dict(change),  # the validated fields as they are (model_dump copies)
        )

    @property
    def run_key(self) -> str:
        """The per-run ordering key (without prefix)."""
        return f"{self.run_type}:{self.run_id}"

    @property
    def deadline(self) -> datetime:
        return datetime.fromtimestamp(self.deadline_ms / 1000, UTC)

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> JobRecord:
        return cls.model_validate(data)

    def to_hash(self) -> dict[str, str]:
        return fields_to_hash(self.model_dump(mode="json", exclude_none=True))


def fields_to_hash(fields: dict[str, Any]) -> dict[str, str]:
    """Encode record fields for HSET: scalars as strings, bools as 1/0, the rest as JSON."""
    out: dict[str, str] = {}
    for name, value in fields.items():
        if isinstance(value, bool):
            out[name] = "1" if value else "0"
        elif isinstance(value, dict | list):
            out[name] = json.dumps(value)
        elif isinstance(value, datetime):
            out[name] = value.isoformat()
        elif isinstance(value, BaseModel):
            out[name] = value.model_dump_json()
        else:
            out[name] = str(value)
    return out


class JobTicket(BaseModel):
    """What a state-change tool answers at once."""

    job_id: str
    status: Status
    run_type: RunType
    run_id: str
    state: StateType
    enqueued_at: datetime
    deduplicated: bool = Field(
        False, description="True when the idempotency key matched an existing job."
    )

    @classmethod
    def of(cls, record: JobRecord, *, deduplicated: bool = False) -> JobTicket:
        return cls(
            job_id=record.job_id,
            status=record.status,
            run_type=record.run_type,
            run_id=record.run_id,
            state=record.state,
            enqueued_at=record.enqueued_at,
            deduplicated=deduplicated,
        )


class JobStatus(BaseModel):
    """A job as callers see it."""

    job_id: str
    status: Status
    run_type: RunType
    run_id: str
    state: StateType
    state_name: str | None = Field(None, description="The state name asked for, if any.")
    scheduled_time: datetime | None = Field(None, description="Asked for, in UTC (SCHEDULED).")
    pause_expiration_time: datetime | None = Field(
        None, description="When the pause asked for ends, in UTC (PAUSED)."
    )
    pause_reschedule: bool = Field(False, description="Asked to reschedule on pause (PAUSED).")
    pause_key: str | None = Field(None, description="The pause key asked for (PAUSED).")
    attempts: int = Field(description="Prefect calls made so far.")
    enqueued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    orchestration: Orchestration | None
    error: JobError | None
    retry_of: str | None = Field(None, description="The job this one submits again, if any.")
    duplicate_transitions: int | None = Field(
        None,
        description="After a retry whose first try may have reached Prefect: extra copies "
        "of this change found in the run's history (0: none). null: not checked (no doubt).",
    )

    @classmethod
    def of(cls, record: JobRecord) -> JobStatus:
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


class Batch(BaseModel):
    """Jobs queued by one `submit_state_changes` call that a client follows as one MCP task."""

    batch_id: str
    client_id: str
    job_ids: list[str]
    created_at: datetime
    cancel_requested: bool = False


def json_serializer(obj: Any) -> bytes:
    """arq payload serializer: JSON, so nobody who can write to Redis can run code."""
    return json.dumps(obj, separators=(",", ":")).encode()


def json_deserializer(data: bytes) -> Any:
    return json.loads(data)
