"""The one job a worker runs: apply a taken change to Prefect and record the outcome.

The dispatcher (`worker.dispatch`) takes jobs and hands each one here with its
record: claimed (its call slot reserved, the call due now) or held (an earlier
try may have reached Prefect, or its deadline passed: settled here first). Its
resources (`store`, `applier`, `concurrency`, `settings`, `redis`) are in arq's
ctx, set up by `worker.app.startup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

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
from worker.dispatch import Slot
from worker.durability import NotDurable
from worker.metrics import JOB_LATENCY_SECONDS, JOBS_FINISHED
from worker.policy import backoff_s
from worker.settings import Settings
from worker.store import JobStore, Taken, WriteTransition

log = logging.getLogger(__name__)

_SLOT_RETRY_S = 0.5
_REDIS_RETRY_S = 1.0
_PROBE_TIMEOUT_S = 1.0


class Reschedule(Exception):
    """Give the job back to the queue, due again in `delay_s`; no attempt used."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.delay_s = delay_s


async def apply_state_change(ctx: dict[str, Any], taken: Taken, slot: Slot | None) -> None:
    """Apply one taken change to Prefect and record the outcome."""
    settings: Settings = ctx["settings"]
    store: JobStore = ctx["store"]
    record = taken.record
    try:
        # A job that outlived this would hold its lease (and a slot) forever.
        async with asyncio.timeout(settings.job_timeout_s):
            try:
                if slot is not None:
                    await _apply_claimed(ctx, record, slot)
                else:
                    await _attempt(ctx, record)
            except (Reschedule, RedisError, TimeoutError):
                raise
            except Exception as exc:
                log.exception("job %s: unexpected error", record.job_id)
                error = JobError(code=ErrorCode.INTERNAL, message=repr(exc)[:500])
                await _finish(
                    store.transition,
                    record,
                    Outcome(Status.FAILED, error=error),
                    allowed=(*PENDING_STATUSES, Status.RUNNING),
                )
    except TimeoutError:
        await _cut_off(store, record.job_id, settings.job_timeout_s)
    except Reschedule as again:
        await store.requeue(record.job_id, delay_s=again.delay_s)
    except RedisError as exc:
        # Its lease lapses and it runs again; the poll loop restarts the worker if
        # Redis is gone for good.
        log.warning("job %s: Redis error, will try again: %s", record.job_id, exc)
        with contextlib.suppress(RedisError):
            await store.requeue(record.job_id, delay_s=_REDIS_RETRY_S)


async def _cut_off(store: JobStore, job_id: str, limit_s: float) -> None:
    """An attempt ran out of time: a defined status, and the job stays queued.

    Its call may have reached Prefect, so the next try settles first (`ambiguous`).
    """
    log.warning("job %s: attempt cut off after %g s; it will be tried again", job_id, limit_s)
    error = JobError(code=ErrorCode.TRANSIENT, message=f"attempt cut off after {limit_s:g} s")
    await store.transition(
        job_id,
        allowed=(Status.RUNNING,),
        status=Status.WAITING,
        set_fields={"ambiguous": True, "error": error, "next_attempt_at": utcnow()},
        due_in_s=_SLOT_RETRY_S,
    )


async def _apply_claimed(ctx: dict[str, Any], record: JobRecord, slot: Slot) -> None:
    """The common case: claimed by the take, its slot reserved; call Prefect now."""
    outcome = await ctx["applier"].apply(record, check_history=False)
    await slot.release()  # the next call goes out while this outcome is written
    # With the take that refills the slot: one round trip for both.
    await _conclude(ctx, record, outcome, uncertain=False, write=ctx["dispatcher"].transition)


async def _attempt(ctx: dict[str, Any], record: JobRecord) -> None:
    """A held job: past its deadline, or an earlier try may have reached Prefect."""
    store: JobStore = ctx["store"]
    settings: Settings = ctx["settings"]
    now = utcnow()
    if now >= record.deadline:
        await _exhausted(
            store.transition, record, "job deadline passed before the change could be applied"
        )
        return
    # A worker died mid-attempt (the job came due again `running`), or the last try
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
            return
    concurrency: AdaptiveLimit = ctx["concurrency"]
    try:
        # The slot is taken before the claim: `running` means a Prefect call is due now.
        async with concurrency.slot(timeout_s=settings.prefect_timeout_s / 2):
            await _claim_and_apply(ctx, record, uncertain)
    except SlotTimeout:
        # Prefect is slow and this worker's calls in flight are at their limit: give
        # the job back (no attempt used) for any worker to take.
        raise Reschedule(_SLOT_RETRY_S) from None


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
    if claim.outcome != "claimed":
        # Parked behind an earlier change to its run (not an attempt: that change's
        # end wakes it), or cancelled or finished meanwhile.
        return
    outcome = await ctx["applier"].apply(record, check_history=uncertain)
    # Written now: this job holds its call slot until then (see Dispatcher.transition).
    await _conclude(ctx, record, outcome, uncertain=uncertain, write=store.transition)


async def _conclude(
    ctx: dict[str, Any],
    record: JobRecord,
    outcome: Outcome,
    *,
    uncertain: bool,
    write: WriteTransition,
) -> None:
    """Record what an attempt decided: finished, or waiting for its next try."""
    settings: Settings = ctx["settings"]
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
        await _finish(write, record, outcome, allowed=(Status.RUNNING,), verify_at=verify_at)
        return
    # An earlier try's uncertainty stands until a history read has settled it.
    ambiguous = outcome.ambiguous or (uncertain and not outcome.history_checked)
    await _defer(write, settings, record, replace(outcome, ambiguous=ambiguous))


async def give_back(store: JobStore, taken: list[Taken], exc: NotDurable) -> None:
    """A take whose claims were not confirmed: no call was made for any of them."""
    for job in taken:
        if job.claimed:
            await _unclaim(store, job.record, False, exc)
        else:  # only leased: due again at once, for whoever takes it
            await store.requeue(job.record.job_id, delay_s=0)


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
        due_in_s=_SLOT_RETRY_S,
    )


async def _settle(store: JobStore, record: JobRecord, settled_at: datetime) -> None:
    """Defer an uncertain job until its interrupted call must be over; no attempt used."""
    await store.transition(
        record.job_id,
        allowed=(Status.RUNNING, Status.WAITING),
        status=Status.WAITING,
        set_fields={"next_attempt_at": settled_at, "ambiguous": True},
        due_in_s=(settled_at - utcnow()).total_seconds(),
    )


async def _defer(
    write: WriteTransition, settings: Settings, record: JobRecord, outcome: Outcome
) -> None:
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
        await _exhausted(write, record, f"{failures} transient failures; last: {reason}")
        return
    if next_at > record.deadline:
        await _exhausted(write, record, f"next try would pass the job deadline; last: {reason}")
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
    await write(
        record.job_id,
        allowed=(Status.RUNNING,),
        status=Status.WAITING,
        set_fields=fields,
        due_in_s=delay,
    )


async def _exhausted(write: WriteTransition, record: JobRecord, message: str) -> None:
    error = JobError(code=ErrorCode.RETRIES_EXHAUSTED, message=message)
    await _finish(
        write,
        record,
        Outcome(Status.FAILED, error=error),
        allowed=(*PENDING_STATUSES, Status.RUNNING),
    )


async def _finish(
    write: WriteTransition,
    record: JobRecord,
    outcome: Outcome,
    *,
    allowed: tuple[Status, ...],
    verify_at: datetime | None = None,
) -> None:
    finished_at = utcnow()
    fields: dict[str, Any] = {"finished_at": finished_at, "attempts": record.attempts}
    clear = ["next_attempt_at", "blocked_on"]
    if outcome.orchestration:
        fields["orchestration"] = outcome.orchestration
    if outcome.error:
        fields["error"] = outcome.error
    else:
        clear.append("error")  # a transient error seen while waiting is history now
    await write(
        record.job_id,
        allowed=allowed,
        status=outcome.status,
        set_fields=fields,
        clear_fields=clear,
        verify_at=verify_at,
    )
    status = outcome.status.value
    JOBS_FINISHED.labels(status).inc()
    JOB_LATENCY_SECONDS.labels(status).observe((finished_at - record.enqueued_at).total_seconds())
    level = logging.WARNING if outcome.status is Status.FAILED else logging.INFO
    if not log.isEnabledFor(level):
        return  # the line below costs more than the rest of this function
    log.log(
        level,
        "job %s",
        status,
        extra={
            "job_id": record.job_id,
            "run_type": record.run_type.value,
            "run_id": record.run_id,
            "client_id": record.client_id,
            "state": record.state.value,
            "status": status,
            "attempts": record.attempts,
            "error_code": outcome.error.code.value if outcome.error else None,
            "reason": (outcome.error.message if outcome.error else None)
            or (outcome.orchestration.reason if outcome.orchestration else None),
        },
    )
