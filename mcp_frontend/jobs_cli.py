"""`pmq jobs`: submit, follow, list, retry and watch jobs from a shell.

An operator's tool: it reads the same settings as the workers (PMQ_REDIS_URL,
...) and talks to Redis directly, through the same validation and enqueue path
as the MCP tools, so it works while every frontend is down. It sees every
client's jobs.

Exit codes, for scripts: 0 every job applied, 1 some rejected, failed or
cancelled, 2 usage error (bad arguments, a bad input line, an unknown job id,
a Redis that does not answer or can never be used as configured: see
worker.redis_check), 3 timeout (some jobs still unfinished).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from redis.exceptions import RedisError
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mcp_frontend.fleet_view import FleetSnapshot, snapshot
from mcp_frontend.jobs import (
    JobNotFound,
    JobQuery,
    JobService,
    NotRetryable,
    open_job_service,
)
from mcp_frontend.progress import failure_reason
from worker.contract import (
    LOCAL_CLIENT,
    InvalidChange,
    JobRecord,
    JobStatus,
    StateChange,
    Status,
)
from worker.durability import NotDurable
from worker.redis_check import RedisUnusable, check_redis
from worker.settings import Settings
from worker.store import IdempotencyConflict, QueueFull, QuotaExceeded

EXIT_APPLIED, EXIT_NOT_APPLIED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
T = TypeVar("T")

jobs = typer.Typer(
    help="Submit, follow, list, retry and watch jobs (talks to Redis directly).",
    no_args_is_help=True,
)
# soft_wrap: a line per job stays one line when piped, whatever the width.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
IdsArg = Annotated[list[str], typer.Argument(help="Job ids.", show_default=False)]


@jobs.command()
def submit(
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help="JSON Lines, one change per line ('-' for stdin).", dir_okay=False
        ),
    ] = None,
    run_type: Annotated[str | None, typer.Option(help="task or flow (one change).")] = None,
    run_id: Annotated[str | None, typer.Option(help="The run's UUID (one change).")] = None,
    state: Annotated[str | None, typer.Option(help="Prefect state type (one change).")] = None,
    message: Annotated[str | None, typer.Option(help="State message (one change).")] = None,
    force: Annotated[bool, typer.Option(help="Skip Prefect's orchestration rules.")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="Key (one change).")] = None,
    name: Annotated[
        str | None, typer.Option(help="State name, e.g. AwaitingRetry (one change).")
    ] = None,
    scheduled_time: Annotated[
        str | None, typer.Option(help="SCHEDULED: ISO 8601 with a zone, or 10m (one change).")
    ] = None,
    pause_timeout: Annotated[
        float | None, typer.Option(help="PAUSED: seconds until the pause expires.")
    ] = None,
    pause_expiration_time: Annotated[
        str | None, typer.Option(help="PAUSED: when the pause expires (ISO 8601, or 10m).")
    ] = None,
    pause_reschedule: Annotated[
        bool | None, typer.Option(help="PAUSED: reschedule on resume (Suspended).")
    ] = None,
    pause_key: Annotated[str | None, typer.Option(help="PAUSED: the pause's key.")] = None,
    client: Annotated[str, typer.Option(help="Client id the jobs belong to.")] = LOCAL_CLIENT,
    as_json: JsonOpt = False,
) -> None:
    """Queue changes (from a JSON Lines file, or one from options); prints their job ids.

    Each line has the fields of `submit_state_changes`: run_type, run_id, state,
    and optionally name, message, force, idempotency_key, scheduled_time,
    pause_timeout, pause_expiration_time, pause_reschedule, pause_key. Every
    line is checked before anything is queued; one bad line queues nothing.
    """
    settings = Settings()
    one = {
        "name": name,
        "message": message,
        "idempotency_key": idempotency_key,
        "scheduled_time": scheduled_time,
        "pause_timeout": pause_timeout,
        "pause_expiration_time": pause_expiration_time,
        "pause_reschedule": pause_reschedule,
        "pause_key": pause_key,
    }
    if file is not None:
        if any(v is not None for v in (run_type, run_id, state, *one.values())):
            _usage("give either --file or --run-type/--run-id/--state, not both")
        text = sys.stdin.read() if str(file) == "-" else _read(file)
        changes = list(_parse_lines(text, settings))
    else:
        if run_type is None or run_id is None or state is None:
            _usage("give --file, or --run-type, --run-id and --state")
        raw = {"run_type": run_type, "run_id": run_id, "state": state, "force": force}
        raw |= {field: value for field, value in one.items() if value is not None}
        changes = [_parse_change(raw, "", settings)]
    if not changes:
        _usage("no changes: the file has no lines")

    async def run(service: JobService) -> list[Any]:
        tickets = []
        for start in range(0, len(changes), settings.max_batch_size):
            batch = changes[start : start + settings.max_batch_size]
            tickets += await service.submit(batch, client)
        return tickets

    try:
        tickets = _run(settings, run)
    except (QueueFull, QuotaExceeded, IdempotencyConflict) as exc:
        _usage(f"nothing was queued: {_refusal(exc)}")
    if as_json:
        _print_json(tickets)
    else:
        for ticket in tickets:
            out.print(ticket.job_id, highlight=False)


@jobs.command()
def status(job_ids: IdsArg, as_json: JsonOpt = False) -> None:
    """Show jobs; exits 0 if all applied, 1 if some ended otherwise, 3 if some are unfinished."""
    settings = Settings()
    records = _run(settings, lambda service: _records(service, job_ids))
    if as_json:
        _print_json([JobStatus.of(r) for r in records])
    else:
        _jobs_table(records)
    raise typer.Exit(_exit_code(records))


@jobs.command()
def wait(
    job_ids: IdsArg,
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds (exit 3).", min=0)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Wait for jobs to finish, with a progress bar on a terminal; exit code as for `status`."""
    settings = Settings()
    ids = list(dict.fromkeys(job_ids))
    records = _run(settings, lambda service: _follow(service, ids, timeout, as_json))
    if as_json:
        _print_json([JobStatus.of(r) for r in records])
    elif not out.is_terminal:
        out.print(_summary(records), highlight=False)
    raise typer.Exit(_exit_code(records))


@jobs.command("list")
def list_(
    status: Annotated[
        list[str] | None, typer.Option("--status", help="Only these statuses (repeatable).")
    ] = None,
    run: Annotated[str | None, typer.Option("--run", help="Only changes to this run.")] = None,
    client: Annotated[str | None, typer.Option(help="Only this client's jobs.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Queued since: 90s, 15m, 2h, 1d or an ISO 8601 time.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The newest jobs, newest first, from the recent-jobs index (PMQ_RECENT_JOBS)."""
    settings = Settings()
    try:
        query = JobQuery.parse(
            statuses=status or (), run_id=run, client_id=client, since=since, limit=limit
        )
    except InvalidChange as exc:
        _usage(f"invalid --{exc.field}: {exc.rule}")
    records = _run(settings, lambda service: service.find(query))
    if as_json:
        _print_json([JobStatus.of(r) for r in records])
    else:
        _jobs_table(records)


@jobs.command()
def retry(job_ids: IdsArg, as_json: JsonOpt = False) -> None:
    """Queue rejected or failed changes again, as new jobs that name the old ones."""
    settings = Settings()

    async def run(service: JobService) -> list[Any]:
        try:
            return await service.retry(job_ids, client_id=None)
        except NotRetryable as exc:
            _usage(
                f"job {exc.status.job_id} is {exc.status.status.value}: only rejected or "
                "failed jobs can be retried; nothing was queued"
            )

    tickets = _run(settings, run)
    if as_json:
        _print_json(tickets)
    else:
        for old, ticket in zip(dict.fromkeys(job_ids), tickets, strict=True):
            out.print(f"{old} -> {ticket.job_id}", highlight=False)


@jobs.command()
def watch(
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.2)] = 1.0,
    once: Annotated[bool, typer.Option(help="Print one view and exit.")] = False,
) -> None:
    """A live view of the queue: depth, rates, Prefect latency, workers, latest failures."""
    settings = Settings()
    max_age_s = 3 * settings.heartbeat_s

    async def run(service: JobService) -> None:
        previous: FleetSnapshot | None = None
        current = await snapshot(service, worker_max_age_s=max_age_s)
        if once or not out.is_terminal:
            while True:
                out.print(_fleet_line(current, previous), highlight=False)
                if once:
                    return
                await asyncio.sleep(interval)
                previous, current = current, await snapshot(service, worker_max_age_s=max_age_s)
        with Live(_fleet_view(current, None), console=out, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval)
                previous, current = current, await snapshot(service, worker_max_age_s=max_age_s)
                live.update(_fleet_view(current, previous), refresh=True)

    try:
        _run(settings, run)
    except KeyboardInterrupt:
        pass


# Following jobs.


async def _records(service: JobService, job_ids: Sequence[str]) -> list[JobRecord]:
    try:
        return await service.records(list(dict.fromkeys(job_ids)), client_id=None)
    except JobNotFound as exc:
        _usage(f"unknown job id {exc.job_id}: no such job, or its record expired")


async def _follow(
    service: JobService, job_ids: list[str], timeout_s: float | None, quiet: bool
) -> list[JobRecord]:
    """Re-read the jobs whenever one finishes (or every second) until all are done."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    started = time.monotonic()
    records = await _records(service, job_ids)
    reported: set[str] = set()
    bar = _progress_bar() if out.is_terminal and not quiet else None
    task = bar.add_task("", total=len(records)) if bar else None
    if bar:
        bar.start()
    try:
        while True:
            done = [r for r in records if r.status.is_terminal]
            if bar is not None and task is not None:
                counts = Counter(r.status.value for r in done)
                rate = len(done) / max(time.monotonic() - started, 1e-3)
                bar.update(
                    task,
                    completed=len(done),
                    description=f"applied {counts['applied']} · rejected {counts['rejected']} "
                    f"· failed {counts['failed']} · {rate:.1f}/s",
                )
            elif not quiet:
                for record in done:
                    if record.job_id not in reported:
                        out.print(_job_line(record), highlight=False)
                        reported.add(record.job_id)
            pending = [r.job_id for r in records if not r.status.is_terminal]
            if not pending:
                return records
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return records
            async with service.waiters.watch(*pending) as finished:
                # The re-read every second also catches an event lost to a Redis blip.
                wait_s = 1.0 if remaining is None else min(1.0, remaining)
                try:
                    await asyncio.wait_for(finished.wait(), wait_s)
                except TimeoutError:
                    pass
            records = await _records(service, job_ids)
    finally:
        if bar:
            bar.stop()


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,  # stdout stays for results
    )


def _exit_code(records: Iterable[JobRecord]) -> int:
    statuses = [r.status for r in records]
    if any(not s.is_terminal for s in statuses):
        return EXIT_TIMEOUT
    if all(s is Status.APPLIED for s in statuses):
        return EXIT_APPLIED
    return EXIT_NOT_APPLIED


# Input.


def _parse_lines(text: str, settings: Settings) -> Iterable[StateChange]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            _usage(f"invalid line {number}: not JSON ({exc.msg}); nothing was queued")
        if not isinstance(raw, dict):
            _usage(f"invalid line {number}: must be a JSON object; nothing was queued")
        yield _parse_change(raw, f"line {number}: ", settings)


# The fields of `submit_state_changes` items, with the JSON type each must have.
_TEXT_FIELDS = ("run_type", "run_id", "state")
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "message": (str,),
    "idempotency_key": (str,),
    "scheduled_time": (str,),
    "pause_expiration_time": (str,),
    "pause_key": (str,),
    "force": (bool,),
    "pause_reschedule": (bool,),
    "pause_timeout": (int, float),
}
_WANTED = {str: "a string", bool: "true or false", int: "a number"}


def _parse_change(raw: dict[str, Any], where: str, settings: Settings) -> StateChange:
    if extra := sorted(set(raw) - {*_TEXT_FIELDS, *_OPTIONAL}):
        _usage(f"invalid {where}{extra[0]}: unknown field; nothing was queued")
    for name in _TEXT_FIELDS:
        if not isinstance(raw.get(name), str):
            _usage(f"invalid {where}{name}: required, a string; nothing was queued")
    for name, kind in _OPTIONAL.items():
        value = raw.get(name)
        wrong_bool = isinstance(value, bool) and bool not in kind  # JSON true is no number
        if value is not None and (wrong_bool or not isinstance(value, kind)):
            _usage(f"invalid {where}{name}: must be {_WANTED[kind[0]]}; nothing was queued")
    try:
        return StateChange.parse(
            max_message_chars=settings.max_message_chars,
            **{"force": False, "message": None, "idempotency_key": None, **raw},
        )
    except InvalidChange as exc:
        _usage(f"invalid {where}{exc.field}: {exc.rule}; nothing was queued")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        _usage(f"cannot read {path}: {exc.strerror}")


# Output.


def _jobs_table(records: Sequence[JobRecord]) -> None:
    if not out.is_terminal:
        for record in records:
            out.print(_job_line(record), highlight=False)
        return
    table = Table("job", "status", "run", "state", "attempts", "client", "reason")
    for r in records:
        table.add_row(
            r.job_id,
            r.status.value,
            f"{r.run_type.value} {r.run_id}",
            r.state.value,
            str(r.attempts),
            r.client_id,
            _reason(r),
        )
    out.print(table)


def _job_line(record: JobRecord) -> str:
    fields = [
        record.job_id,
        record.status.value,
        record.run_type.value,
        record.run_id,
        record.state.value,
        f"attempts={record.attempts}",
    ]
    if record.retry_of:
        fields.append(f"retry_of={record.retry_of}")
    if reason := _reason(record):
        fields.append(f"reason={json.dumps(reason)}")
    return " ".join(fields)


def _reason(record: JobRecord) -> str:
    return failure_reason(record) or ""


def _summary(records: Sequence[JobRecord]) -> str:
    counts = Counter(r.status.value for r in records)
    return "total " + str(len(records)) + "".join(f" {k}={v}" for k, v in sorted(counts.items()))


def _rates(current: FleetSnapshot, previous: FleetSnapshot | None) -> dict[str, float | None]:
    if previous is None:
        return {"applied": None, "rejected": None, "failed": None}
    seconds = max((current.at - previous.at).total_seconds(), 1e-3)
    return {
        name: (current.totals[name] - previous.totals[name]) / seconds
        for name in ("applied", "rejected", "failed")
    }


def _rate_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fleet_line(current: FleetSnapshot, previous: FleetSnapshot | None) -> str:
    rates = _rates(current, previous)
    return (
        f"{current.at.isoformat(timespec='seconds')} depth={current.queue_depth} "
        f"queued={current.live['queued']} running={current.live['running']} "
        f"waiting={current.live['waiting']} applied/s={_rate_text(rates['applied'])} "
        f"rejected/s={_rate_text(rates['rejected'])} failed/s={_rate_text(rates['failed'])} "
        f"prefect_ms={_ms(current)} workers={current.workers_alive} "
        f"applied={current.totals['applied']} rejected={current.totals['rejected']} "
        f"failed={current.totals['failed']}"
    )


def _fleet_view(current: FleetSnapshot, previous: FleetSnapshot | None) -> Table:
    rates = _rates(current, previous)
    grid = Table.grid(padding=(0, 2))
    grid.add_row(
        "queue depth", str(current.queue_depth), "workers alive", str(current.workers_alive)
    )
    grid.add_row("queued", str(current.live["queued"]), "running", str(current.live["running"]))
    grid.add_row("waiting", str(current.live["waiting"]), "Prefect latency (ms)", _ms(current))
    grid.add_row(
        "applied/s", _rate_text(rates["applied"]), "rejected/s", _rate_text(rates["rejected"])
    )
    grid.add_row("failed/s", _rate_text(rates["failed"]), "", "")
    failures = Table("latest failures", "status", "run", "reason", title=None)
    for f in current.failures:
        failures.add_row(f.job_id, f.status, f"{f.run_type} {f.run_id}", f.reason)
    outer = Table.grid()
    outer.add_row(grid)
    outer.add_row(failures)
    return outer


def _ms(current: FleetSnapshot) -> str:
    return "-" if current.prefect_ms is None else f"{current.prefect_ms:.0f}"


def _print_json(items: Sequence[BaseModel]) -> None:
    out.print_json(json.dumps([item.model_dump(mode="json") for item in items]))


# Plumbing.


def _run(settings: Settings, call: Any) -> Any:
    """Run `call(service)` on a fresh JobService; Redis trouble is a clear error, exit 2."""

    async def main() -> Any:
        await check_redis(settings)  # a TLS or password mistake said plainly, and at once
        async with open_job_service(settings) as service:
            return await call(service)

    try:
        return asyncio.run(main())
    except RedisUnusable as exc:
        _usage(f"error: {exc}")
    except RedisError as exc:
        err.print(f"Redis unavailable at the configured PMQ_REDIS_URL: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    except NotDurable as exc:
        # Batches go one by one: those before this one are stored (and their tickets
        # not printed), so the advice is about looking before sending again.
        if not exc.written:
            _usage(f"this batch was not queued: {exc.reason}")
        _usage(
            f"the last batch may or may not be stored: {exc.reason}. Changes with an "
            "idempotency key can be submitted again safely; look the others up "
            "(pmq jobs list) before sending them again."
        )


def _refusal(exc: Exception) -> str:
    if isinstance(exc, QueueFull):
        return "the queue is full, retry later"
    if isinstance(exc, IdempotencyConflict):
        return f"changes[{exc.index}].idempotency_key: {exc.detail}"
    return str(exc)


def _usage(message: str) -> NoReturn:
    err.print(message, highlight=False, markup=False)
    raise typer.Exit(EXIT_USAGE)
