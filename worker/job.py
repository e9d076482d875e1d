"""The one job a worker runs: apply a queued change to Prefect and record the outcome.

arq stays behind this module and `worker.store`: the job function gets a job
id, everything else comes from the record in Redis. Its resources (`store`,
`applier`, `concurrency`, `settings`, `redis`) are in arq's ctx, set up by
`worker.app.startup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Retry
from redis.exceptions import RedisError

from worker.applier import Outcome, PrefectApplier
from worker.concurrency import AdaptiveLimit, SlotTimeout
from worker.contract import (
    PENDING_STATUSES,
    ErrorCode,
    JobError,
    JobRecord,
    Status,
    utcnow,
)
from worker.durability import NotDurable
from worker.metrics import JOB_LATENCY_SECONDS, JOBS_FINISHED
from worker.policy import backoff_s
from worker.settings import Settings
from worker.store import JobStore

log = logging.getLogger(__name__)

_PARKED = "pmq_parked"  # ctx flag: this run of the job parked it behind an earlier change
_SLOT_RETRY_S = 0.5
_PROBE_TIMEOUT_S = 1.0


async def apply_state_change(ctx: dict[str, Any], job_id: str) -> None:
    """Apply one queued change to Prefect and record the outcome."""
    settings: Settings = ctx["settings"]
    try:
        # Ours, inside arq's (which is longer): arq would drop a job it times out,
        # leaving its record `running` with no queue entry.
        async with asyncio.timeout(settings.job_timeout_s):
            await _run(ctx, job_id)
    except TimeoutError:
        await _cut_off(ctx["store"], job_id, settings.job_timeout_s)
    except RedisError as exc:
        # Any exception but Retry would make arq drop the job; this keeps it queued.
        log.warning("job %s: Redis error, will try again: %s", job_id, exc)
        raise Retry(defer=1.0) from exc


async def _cut_off(store: JobStore, job_id: str, limit_s: float) -> None:
    """An attempt ran out of time: a defined status, and the job stays queued.

    Its call may have reached Prefect, so the next try settles first (`ambiguous`).
    """
    log.warning("job %s: attempt cut off after %g s; it will be tried again", job_id, limit_s)
    error = JobError(code=ErrorCode.TRANSIENT, message=f"attempt cut off after {limit_s:g} s")
    moved = await store.transition(
        job_id,
        allowed=(Status.RUNNING,),
        status=Status.WAITING,
        set_fields={"ambiguous": True, "error": error, "next_attempt_at": utcnow()},
    )
    if moved.applied or (moved.status is not None and not moved.status.is_terminal):
        raise Retry(defer=_SLOT_RETRY_S)


async def _run(ctx: dict[str, Any], job_id: str) -> None:
    store: JobStore = ctx["store"]
    record = await store.load(job_id)
    if record is None:
        log.warning("job %s has no record (expired or deleted); nothing to apply", job_id)
        return
    if record.status.is_terminal:
        return  # cancelled while queued, or a re-delivery of a finished job
    try:
        async with _lease(ctx["redis"], job_id, ctx["settings"].worker_lease_s):
            await _attempt(ctx, record)
    except (Retry, RedisError):
        raise
    except Exception as exc:
        log.exception("job %s: unexpected error", job_id)
        error = JobError(code=ErrorCode.INTERNAL, message=repr(exc)[:500])
        await _finish(
            store,
            record,
            Outcome(Status.FAILED, error=error),
            allowed=(*PENDING_STATUSES, Status.RUNNING),
        )


@contextlib.asynccontextmanager
async def _lease(redis: ArqRedis, job_id: str, lease_s: float) -> AsyncIterator[None]:
    """Keep arq's in-progress key alive while this worker holds the job.

    arq would keep it for the longest job timeout plus 10 s, so a killed
    worker's jobs would wait minutes; a short lease renewed by the living
    worker brings that down to `lease_s`.
    """

    async def renew() -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                await redis.pexpire(in_progress_key_prefix + job_id, int(lease_s * 1000))
            except RedisError:
                log.warning("job %s: could not renew its lease", job_id, exc_info=True)

    renewer = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer


async def _attempt(ctx: dict[str, Any], record: JobRecord) -> None:
    store: JobStore = ctx["store"]
    settings: Settings = ctx["settings"]
    now = utcnow()
    if now >= record.deadline:
        await _exhausted(store, record, "job deadline passed before the change could be applied")
        return
    # A worker died mid-attempt (arq re-delivered a `running` job), or the last try
    # ended without an answer: Prefect may have written the change, even after the
    # call timed out. Read the history only once that call must be over.
    uncertain = record.status is Status.RUNNING or record.ambiguous
    if uncertain:
        applier: PrefectApplier = ctx["applier"]
        if applier.answering_since is None:
            # Short (1 s plus the hard limit's 1 s): a Prefect slower than that is not
            # answering promptly yet, and the run keeps its budget for the calls
            # that count (the job timeout allows 2 s for this probe).
            await applier.probe(timeout_s=_PROBE_TIMEOUT_S)
        settled_at = _settled_at(applier, settings, record)
        if now < settled_at:
            await _settle(store, record, settled_at)
    concurrency: AdaptiveLimit = ctx["concurrency"]
    try:
        # The slot is taken before the claim: `running` means a Prefect call is due now.
        async with concurrency.slot(timeout_s=settings.prefect_timeout_s / 2):
            await _claim_and_apply(ctx, record, uncertain)
    except SlotTimeout:
        # Prefect is slow and this worker's calls in flight are at their limit: give
        # the job back (still `queued`, no attempt used) for any worker to take.
        raise Retry(defer=_SLOT_RETRY_S) from None


def _settled_at(applier: PrefectApplier, settings: Settings, record: JobRecord) -> datetime:
    """From when a history read without this job's transition proves that no earlier
    try of it can still be written.

    The earlier call must be over (its timeout plus `settle_s`), and Prefect must have
    answered every call for `settle_s`: a stalled server (SIGSTOP, `docker pause`, a
    saturated host) keeps the requests it has read, and processes them when it wakes,
    in any order with the history read. While Prefect does not answer, never.
    """
    settle = timedelta(seconds=settings.settle_s)
    if applier.answering_since is None:
        return utcnow() + settle  # look again then; no attempt is used meanwhile
    settled_at = applier.answering_since + settle
    if record.attempt_started_at is not None:
        call_over = record.attempt_started_at + timedelta(seconds=settings.prefect_timeout_s)
        settled_at = max(settled_at, call_over + settle)
    return settled_at


async def _claim_and_apply(ctx: dict[str, Any], record: JobRecord, uncertain: bool) -> None:
    store: JobStore = ctx["store"]
    settings: Settings = ctx["settings"]
    now = utcnow()
    recheck_s = min(settings.gate_recheck_s, max((record.deadline - now).total_seconds(), 0.1))
    try:
        claim = await store.claim(
            record.job_id,
            allowed=(*PENDING_STATUSES, Status.RUNNING),
            set_fields={"started_at": record.started_at or now, "attempt_started_at": now},
            recheck_at=now + timedelta(seconds=recheck_s),
        )
    except NotDurable as exc:
        await _unclaim(store, record, uncertain, exc)
        return
    if claim.outcome == "blocked":
        # Waiting behind an earlier change to this run: not an attempt. The earlier
        # change wakes this one when it finishes; the deferral is only a safety net.
        ctx[_PARKED] = True
        raise Retry(defer=recheck_s)
    if claim.outcome != "claimed":
        return  # cancelled or finished meanwhile
    outcome = await ctx["applier"].apply(record, check_history=uncertain)
    if outcome.called:
        record = record.model_copy(update={"attempts": record.attempts + 1})
    if outcome.status is not Status.WAITING:
        verify_at = None
        if outcome.resent and outcome.status is Status.APPLIED:
            # The rule above makes a duplicate unlikely, not impossible (a Prefect of
            # several API processes, one frozen): look once more when all calls are over.
            verify_at = utcnow() + timedelta(
                seconds=settings.prefect_timeout_s + 2 * settings.settle_s
            )
        await _finish(store, record, outcome, allowed=(Status.RUNNING,), verify_at=verify_at)
        return
    # An earlier try's uncertainty stands until a history read has settled it.
    ambiguous = outcome.ambiguous or (uncertain and not outcome.history_checked)
    await _defer(store, settings, record, replace(outcome, ambiguous=ambiguous))


async def _unclaim(store: JobStore, record: JobRecord, uncertain: bool, exc: NotDurable) -> None:
    """The claim was not stored at the durability level: Prefect is not called.

    A failover could bring back the job as never claimed while Prefect had the change,
    and it would be applied twice. Back to `waiting`, no attempt used.
    """
    if exc.written:
        log.warning("job %s: claim not confirmed (%s); it will be tried again", record.job_id, exc)
    else:  # a configuration problem, not a passing one: say it loudly
        log.error("job %s: claim refused: %s; it will be tried again", record.job_id, exc)
    error = JobError(code=ErrorCode.TRANSIENT, message=f"claim not confirmed: {exc}")
    await store.transition(
        record.job_id,
        allowed=(Status.RUNNING,),
        status=Status.WAITING,
        set_fields={"next_attempt_at": utcnow(), "error": error, "ambiguous": uncertain},
    )
    raise Retry(defer=_SLOT_RETRY_S)


async def _settle(store: JobStore, record: JobRecord, settled_at: datetime) -> None:
    """Defer an uncertain job until its interrupted call must be over; no attempt used."""
    moved = await store.transition(
        record.job_id,
        allowed=(Status.RUNNING, Status.WAITING),
        status=Status.WAITING,
        set_fields={"next_attempt_at": settled_at, "ambiguous": True},
    )
    if moved.applied:
        raise Retry(defer=(settled_at - utcnow()).total_seconds())


async def _defer(store: JobStore, settings: Settings, record: JobRecord, outcome: Outcome) -> None:
    """Send a job back to the queue after a transient error, a WAIT or the rate limit."""
    failures = record.transient_failures + (1 if outcome.transient else 0)
    if outcome.transient:
        delay = backoff_s(
            failures,
            base_s=settings.backoff_base_s,
            max_s=settings.backoff_max_s,
            retry_after_s=outcome.delay_s,
        )
    else:
        delay = outcome.delay_s or 0.0
    next_at = utcnow() + timedelta(seconds=delay)
    if outcome.error:
        reason = outcome.error.message
    elif outcome.orchestration:
        reason = f"Prefect answered WAIT: {outcome.orchestration.reason}"
    else:
        reason = "the shared Prefect rate limit"
    if failures >= settings.max_attempts:
        await _exhausted(store, record, f"{failures} transient failures; last: {reason}")
        return
    if next_at > record.deadline:
        await _exhausted(store, record, f"next try would pass the job deadline; last: {reason}")
        return
    fields: dict[str, Any] = {
        "next_attempt_at": next_at,
        "transient_failures": failures,
        "attempts": record.attempts,
        "ambiguous": outcome.ambiguous,
    }
    if outcome.orchestration:
        fields["orchestration"] = outcome.orchestration
    if outcome.error:
        fields["error"] = outcome.error
    moved = await store.transition(
        record.job_id, allowed=(Status.RUNNING,), status=Status.WAITING, set_fields=fields
    )
    if moved.applied:
        raise Retry(defer=delay)


async def _exhausted(store: JobStore, record: JobRecord, message: str) -> None:
    error = JobError(code=ErrorCode.RETRIES_EXHAUSTED, message=message)
    await _finish(
        store,
        record,
        Outcome(Status.FAILED, error=error),
        allowed=(*PENDING_STATUSES, Status.RUNNING),
    )


async def _finish(
    store: JobStore,
    record: JobRecord,
    outcome: Outcome,
    *,
    allowed: tuple[Status, ...],
    verify_at: datetime | None = None,
) -> None:
    fields: dict[str, Any] = {"finished_at": utcnow(), "attempts": record.attempts}
    if verify_at is not None:
        fields["verify_at_ms"] = int(verify_at.timestamp() * 1000)
    clear = ["next_attempt_at", "blocked_on"]
    if outcome.orchestration:
        fields["orchestration"] = outcome.orchestration
    if outcome.error:
        fields["error"] = outcome.error
    else:
        clear.append("error")  # a transient error seen while waiting is history now
    await store.transition(
        record.job_id, allowed=allowed, status=outcome.status, set_fields=fields, clear_fields=clear
    )
    JOBS_FINISHED.labels(outcome.status.value).inc()
    JOB_LATENCY_SECONDS.labels(outcome.status.value).observe(
        (fields["finished_at"] - record.enqueued_at).total_seconds()
    )
    level = logging.WARNING if outcome.status is Status.FAILED else logging.INFO
    log.log(
        level,
        "job %s",
        outcome.status.value,
        extra={
            "job_id": record.job_id,
            "run_type": record.run_type.value,
            "run_id": record.run_id,
            "client_id": record.client_id,
            "state": record.state.value,
            "status": outcome.status.value,
            "attempts": record.attempts,
            "error_code": outcome.error.code.value if outcome.error else None,
            "reason": (outcome.error.message if outcome.error else None)
            or (outcome.orchestration.reason if outcome.orchestration else None),
        },
    )


async def after_job_end(ctx: dict[str, Any]) -> None:
    """Close the race between parking a job and its blocker finishing.

    arq re-scores a retried job after our function returns, which can overwrite
    the wake-up the blocker sent in between; re-checking here catches that.
    """
    if ctx.get(_PARKED):
        await ctx["store"].recheck_parked(ctx["job_id"])
