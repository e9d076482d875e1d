"""Helpers for the fleet tests: many runs, many clients, waiting for a drain."""

import time
from collections.abc import Sequence
from typing import Any

from mcp import Client

from tests.mcp_calls import ok
from worker.contract import TERMINAL_STATUSES


async def statuses(client: Client, job_ids: Sequence[str]) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for start in range(0, len(job_ids), 1000):
        chunk = list(job_ids[start : start + 1000])
        jobs.extend((await ok(client, "get_jobs", job_ids=chunk))["jobs"])
    return jobs


async def wait_all_terminal(
    client: Client, job_ids: Sequence[str], timeout_s: float
) -> list[dict[str, Any]]:
    """Poll until every job is terminal; long-polls an unfinished one between reads."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = await statuses(client, job_ids)
        pending = [j["job_id"] for j in jobs if j["status"] not in TERMINAL_STATUSES]
        if not pending:
            return jobs
        left = deadline - time.monotonic()
        assert left > 0, f"{len(pending)} of {len(job_ids)} jobs not terminal in {timeout_s} s"
        await ok(client, "get_job", job_id=pending[0], wait_s=min(2.0, left))


async def make_runs(
    prefect: Any, count: int, *, kinds: Sequence[str] = ("task", "flow")
) -> list[tuple[str, str]]:
    """`count` runs in PENDING, alternating over `kinds`, as (run_type, run_id).

    One at a time: SQLite serialises Prefect's writes, and concurrent creation
    only earns 503s ("database is locked").
    """
    runs: list[tuple[str, str]] = []
    for index in range(count):
        kind = kinds[index % len(kinds)]
        runs.append((kind, await (prefect.task_run() if kind == "task" else prefect.flow_run())))
    return runs
