"""B5 MCP tasks: what following a change as a task costs, against the plain tools.

Same run, same stack (Redis, a SQLite Prefect server, one `pmq worker`, one
`pmq serve --transport http`), same wire client (2026-07-28 envelope over
httpx), only the declared capability differs:

- answer: 300 `set_task_run_state` calls one at a time, alternating a request
  that declares `io.modelcontextprotocol/tasks` (answered with a task) and one
  that does not (answered with a ticket); latency per call.
- read: `tasks/get` against `get_job` (no wait) on the same finished jobs.
- follow: 20 clients each queue 10 changes and follow them to the end, three
  ways: as tasks polled with `tasks/get` as `pollIntervalMs` says; as tasks
  pushed on one `subscriptions/listen` per client (`notifications/tasks`); and
  the plain way (`get_job` with `wait_s=30`, which answers when the job
  finishes). Counted: requests per change, and the lag from the job's
  `finished_at` to the answer (or notification) that reported it.

    .venv/bin/python bench/b5_tasks.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import BenchStack, Report, bench_stack, percentile, table
from bench.workload import create_task_runs
from tests.tasks_client import TasksClient

ANSWER_CALLS = 300
CLIENTS, PER_CLIENT = 20, 10
Way = Literal["poll", "listen", "long-poll"]
WAYS: dict[Way, str] = {
    "poll": "tasks/get, pollIntervalMs",
    "listen": "subscriptions/listen, notifications/tasks",
    "long-poll": "get_job wait_s=30 (baseline)",
}


FOLLOW_COLUMNS = [
    "follow with",
    "changes",
    "requests_per_change",
    "lag_p50_ms",
    "lag_p95_ms",
    "lag_p99_ms",
    "p50_vs_long_poll",
]


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 2),
        "p99_ms": round(percentile(values, 99) * 1000, 2),
    }


async def answer_latency(url: str, runs: list[str]) -> tuple[list[float], list[float], list[str]]:
    """Latency of a task answer and of a ticket, interleaved so drift hits both alike."""
    task_s: list[float] = []
    ticket_s: list[float] = []
    job_ids: list[str] = []
    async with TasksClient(url) as client:
        for index, run in enumerate(runs[:ANSWER_CALLS]):
            as_task = index % 2 == 0
            args = {"task_run_id": run, "state": "RUNNING"}
            started = time.perf_counter()
            exchange = await client.call_tool("set_task_run_state", args, tasks=as_task)
            (task_s if as_task else ticket_s).append(time.perf_counter() - started)
            result = exchange.result
            job_ids.append(result["taskId"] if as_task else result["structuredContent"]["job_id"])
    return task_s, ticket_s, job_ids


async def read_latency(url: str, job_ids: list[str]) -> tuple[list[float], list[float]]:
    get_s: list[float] = []
    job_s: list[float] = []
    async with TasksClient(url) as client:
        for job_id in job_ids:
            started = time.perf_counter()
            assert (await client.get(job_id)).result["status"] == "completed"
            get_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            plain = await client.call_tool("get_job", {"job_id": job_id}, tasks=False)
            job_s.append(time.perf_counter() - started)
            assert plain.result["structuredContent"]["status"] == "applied"
    return get_s, job_s


async def follow(url: str, runs: list[str], *, way: Way) -> tuple[list[float], list[float]]:
    """Requests per change and lag after finish, for CLIENTS clients following their changes."""
    requests: list[float] = []
    lags: list[float] = []

    def heard(job: dict[str, Any], requests_for_it: float) -> None:
        seen = datetime.now(UTC)
        requests.append(requests_for_it)
        lags.append((seen - datetime.fromisoformat(job["finished_at"])).total_seconds())

    async def one_client(mine: list[str]) -> None:
        as_tasks = way != "long-poll"
        async with TasksClient(url) as client:
            ids = []
            for run in mine:
                args = {"task_run_id": run, "state": "COMPLETED"}
                result = (await client.call_tool("set_task_run_state", args, tasks=as_tasks)).result
                ids.append(result["taskId"] if as_tasks else result["structuredContent"]["job_id"])
            if way == "listen":
                await _listen(client, ids, heard)
                return
            for job_id in ids:
                count, job = await (_poll_task if as_tasks else _long_poll)(client, job_id)
                heard(job, count)

    shares = [runs[i * PER_CLIENT : (i + 1) * PER_CLIENT] for i in range(CLIENTS)]
    await asyncio.gather(*(one_client(share) for share in shares))
    return requests, lags


async def _listen(
    client: TasksClient, task_ids: list[str], heard: Callable[[dict[str, Any], float], None]
) -> None:
    """One listen for all of a client's tasks; its one request shared among them."""
    finished: set[str] = set()
    async with client.listen(task_ids) as stream:
        async for message in stream:
            task = message.get("params", {})
            if message.get("method") == "notifications/tasks" and task["status"] == "completed":
                heard(task["result"]["structuredContent"], 1 / len(task_ids))
                finished.add(task["taskId"])
            if message.get("id") == stream.request["id"]:
                break
    if finished != set(task_ids):
        raise RuntimeError(f"the listen ended before every task finished: {message}")


async def _poll_task(client: TasksClient, task_id: str) -> tuple[int, dict[str, Any]]:
    count = 0
    while True:
        count += 1
        task = (await client.get(task_id)).result
        if task["status"] == "completed":
            return count, task["result"]["structuredContent"]
        await asyncio.sleep(task["pollIntervalMs"] / 1000)


async def _long_poll(client: TasksClient, job_id: str) -> tuple[int, dict[str, Any]]:
    count = 0
    while True:
        count += 1
        args = {"job_id": job_id, "wait_s": 30}
        job = (await client.call_tool("get_job", args, tasks=False)).result["structuredContent"]
        if job["finished_at"]:
            return count, job


async def run(stack: BenchStack, report: Report) -> None:
    stack.worker("worker-1")
    _, url = stack.frontend("frontend")
    runs = await create_task_runs(
        stack.prefect.api_url, ANSWER_CALLS + len(WAYS) * CLIENTS * PER_CLIENT
    )

    task_s, ticket_s, job_ids = await answer_latency(url, runs)
    async with TasksClient(url) as client:
        for job_id in job_ids:  # every change applied before reads are timed
            await _long_poll(client, job_id)
    get_s, job_s = await read_latency(url, job_ids)
    answer_rows = [
        {"call": "set_task_run_state answered with a task", **_ms(task_s)},
        {"call": "set_task_run_state answered with a ticket (baseline)", **_ms(ticket_s)},
        {"call": "tasks/get on a finished task", **_ms(get_s)},
        {"call": "get_job on a finished job (baseline)", **_ms(job_s)},
    ]
    table(answer_rows, ["call", "p50_ms", "p99_ms"])

    offset = ANSWER_CALLS
    follow_rows: dict[Way, dict[str, Any]] = {}
    for way, label in WAYS.items():
        mine = runs[offset : offset + CLIENTS * PER_CLIENT]
        offset += CLIENTS * PER_CLIENT
        requests, lags = await follow(url, mine, way=way)
        follow_rows[way] = {
            "follow with": label,
            "changes": len(requests),
            "requests_per_change": round(sum(requests) / len(requests), 2),
            "lag_p50_ms": round(median(lags) * 1000, 1),
            "lag_p95_ms": round(percentile(lags, 95) * 1000, 1),
            "lag_p99_ms": round(percentile(lags, 99) * 1000, 1),
        }
    baseline = follow_rows["long-poll"]["lag_p50_ms"]
    for row in follow_rows.values():
        row["p50_vs_long_poll"] = round(row["lag_p50_ms"] / baseline, 2)
    table(list(follow_rows.values()), FOLLOW_COLUMNS)
    report.sections["answer"] = answer_rows
    report.sections["follow"] = list(follow_rows.values())
    ratio = answer_rows[0]["p50_ms"] / answer_rows[1]["p50_ms"]
    report.goal(
        "a task answer costs at most 1.5x a ticket (p50)",
        ratio <= 1.5,
        f"{answer_rows[0]['p50_ms']:.1f} ms vs {answer_rows[1]['p50_ms']:.1f} ms, {ratio:.2f}x",
    )
    pushed = follow_rows["listen"]
    report.goal(
        "a listen reports a finished change within 20 ms (lag p50)",
        pushed["lag_p50_ms"] <= 20,
        f"{pushed['lag_p50_ms']:.1f} ms",
    )
    report.goal(
        "a listen reports it within 2x of the get_job long-poll (lag p50)",
        pushed["p50_vs_long_poll"] <= 2,
        f"{pushed['lag_p50_ms']:.1f} ms vs {baseline:.1f} ms, {pushed['p50_vs_long_poll']:.2f}x",
    )


def main() -> None:
    report = Report("b5_tasks", ".venv/bin/python bench/b5_tasks.py")
    started = time.monotonic()
    with bench_stack() as stack:
        asyncio.run(run(stack, report))
    report.sections["runtime_s"] = round(time.monotonic() - started, 1)
    report.save()


if __name__ == "__main__":
    main()
