"""The words and poll intervals that tasks/get and get_job's progress notifications use."""

from datetime import UTC, datetime, timedelta

from mcp_frontend.progress import Drain, describe, poll_interval_ms
from worker.contract import (
    ErrorCode,
    JobError,
    JobRecord,
    Orchestration,
    RunType,
    StateChange,
    StateType,
    Status,
)
from worker.store import Progress

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
RUN = "6f1c1a9e-1d7e-4a8e-9a35-3c1c7b0e5a10"


def _record(status: Status, **fields: object) -> JobRecord:
    change = StateChange(run_type=RunType.TASK, run_id=RUN, state=StateType.COMPLETED)
    record = JobRecord.new(change, enqueued_at=NOW, deadline_s=600, client_id="local")
    return record.model_copy(update={"status": status, **fields})


def test_queued_says_how_many_are_ahead() -> None:
    assert describe(_record(Status.QUEUED), Progress(0, False, 37), NOW) == (
        "queued: 37 changes ahead in the queue"
    )
    assert describe(_record(Status.QUEUED), Progress(0, False, 0), NOW) == (
        "queued: next in line for a worker"
    )


def test_waiting_on_a_transient_error_names_it_the_attempt_and_the_next_try() -> None:
    record = _record(
        Status.WAITING,
        attempts=3,
        next_attempt_at=NOW + timedelta(seconds=2.1),
        error=JobError(code=ErrorCode.TRANSIENT, message="Prefect answered HTTP 503"),
    )
    assert describe(record, Progress(0, False, -1), NOW) == (
        "waiting: Prefect answered HTTP 503, attempt 3, next try in 2.1 s"
    )


def test_waiting_behind_earlier_changes_to_the_run() -> None:
    record = _record(Status.WAITING, blocked_on="a" * 32)
    assert describe(record, Progress(2, False, -1), NOW) == (
        "waiting: behind 2 earlier changes to this run"
    )
    assert describe(record, Progress(100, True, -1), NOW) == (
        "waiting: behind 100+ earlier changes to this run"
    )


def test_finished_jobs_say_what_prefect_decided() -> None:
    applied = _record(
        Status.APPLIED, orchestration=Orchestration(status="ACCEPT", state_type="COMPLETED")
    )
    assert describe(applied, None, NOW) == "applied: the task run is now COMPLETED"
    rejected = _record(
        Status.REJECTED, orchestration=Orchestration(status="ABORT", reason="run is not RUNNING")
    )
    assert describe(rejected, None, NOW) == "rejected: Prefect answered ABORT: run is not RUNNING"
    failed = _record(
        Status.FAILED, error=JobError(code=ErrorCode.RUN_NOT_FOUND, message="no such run")
    )
    assert describe(failed, None, NOW) == "failed: run_not_found: no such run"


def test_poll_interval_follows_the_drain_rate_within_bounds() -> None:
    # 100 ahead at 50 jobs/s: due in about 2 s, so ask again in about 0.7 s.
    assert poll_interval_ms(Drain(50.0, 100), jobs_ahead=100) == 673
    assert poll_interval_ms(Drain(1000.0, 0), jobs_ahead=0) == 250  # floor
    assert poll_interval_ms(Drain(1.0, 10_000), jobs_ahead=10_000) == 3000  # ceiling
    assert poll_interval_ms(Drain(None, 5), jobs_ahead=5) == 1000  # no rate measured yet
    assert poll_interval_ms(Drain(0.0, 5), jobs_ahead=5) == 3000  # nothing draining
    assert poll_interval_ms(Drain(50.0, 0), jobs_ahead=0, next_attempt_in_s=3.0) == 1000
