"""Helpers for the fleet tests: many runs, many clients, waiting for a drain."""

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

from mcp import Client

from tests.mcp_calls import ok
from tests.prefect_runs import PrefectRuns
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


STATES = ["RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED", "PAUSED", "SCHEDULED"]


def plan_changes(runs: Sequence[tuple[str, str]], steps: int, seed: int) -> list[dict[str, Any]]:
    """`steps` forced changes per run, runs interleaved at random, per-run order kept."""
    rng = random.Random(seed)
    queues = {
        run_id: [
            {
                "run_type": run_type,
                "run_id": run_id,
                "state": rng.choice(STATES),
                "message": f"{run_id}:{step}",
                "force": True,
            }
            for step in range(steps)
        ]
        for run_type, run_id in runs
    }
    order = [run_id for run_id, changes in queues.items() for _ in changes]
    rng.shuffle(order)
    return [queues[run_id].pop(0) for run_id in order]


async def submit_mixed(client: Client, changes: list[dict[str, Any]], seed: int) -> list[str]:
    """Submit in order, as a random mix of single calls and batches of 2-25."""
    rng = random.Random(seed)
    job_ids: list[str] = []
    index = 0
    while index < len(changes):
        if rng.random() < 0.5:
            change = changes[index]
            field = f"{change['run_type']}_run_id"
            args = {k: v for k, v in change.items() if k not in ("run_type", "run_id")}
            tool = f"set_{change['run_type']}_run_state"
            job_ids.append((await ok(client, tool, **{field: change["run_id"]}, **args))["job_id"])
            index += 1
        else:
            batch = changes[index : index + rng.randint(2, 25)]
            tickets = (await ok(client, "submit_state_changes", changes=batch))["jobs"]
            job_ids.extend(t["job_id"] for t in tickets)
            index += len(batch)
    return job_ids


async def assert_histories_match(prefect: PrefectRuns, changes: Sequence[dict[str, Any]]) -> None:
    """Each run's history after its initial state is exactly its changes, in order."""
    expected: dict[str, list[tuple[str, str]]] = {}
    kinds: dict[str, str] = {}
    for change in changes:
        expected.setdefault(change["run_id"], []).append((change["state"], change["message"]))
        kinds[change["run_id"]] = change["run_type"]
    limit = asyncio.Semaphore(8)

    async def check(run_id: str) -> None:
        async with limit:
            history = await prefect.history(kinds[run_id], run_id)
        seen = [(s["type"], s["message"]) for s in history[1:]]
        assert seen == expected[run_id], f"run {run_id}: {seen} != {expected[run_id]}"

    await asyncio.gather(*(check(run_id) for run_id in expected))
