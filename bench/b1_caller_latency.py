"""B1: how long does an agent wait for `set_task_run_state`, against what it would wait anyway?

Starts its own Redis, Prefect server (SQLite) and `pmq serve --transport
http` (with the bench-only `noop` tool). Clients are real MCP clients over
streamable HTTP, spread over 2 client processes (1 for a single client) so
the bench's own Python is not the only bottleneck. In the same run:

1. at 1, 10 and 50 concurrent clients, no workers running (pure enqueue):
   - `set_task_run_state` (queue), calls/s, p50, p99;
   - `noop` on the same server process: the MCP transport's own cost;
   - direct: Prefect's client calling set_task_run_state and waiting for
     Prefect's answer, as existing Prefect MCP servers do;
2. saturated: 2 workers drain a 2,000-change burst while 10 agents call
   `set_task_run_state` 5 times a second each and 10 others call Prefect
   directly, each call waiting for the one before; twice: all processes
   sharing both cores, then pinned (`sched_setaffinity`, as `taskset` does)
   with the clients and the frontend on core 0 and Prefect, the workers and
   Redis on core 1, as separate machines would have them;
3. scale-out: 50 clients against `pmq serve --processes 2` vs 1 process.

Writes bench/results/b1_caller_latency.json and b1_latency.png.

    .venv/bin/python bench/b1_caller_latency.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import RESULTS, Report, bench_stack, percentile, process_tree, table
from bench.workload import create_task_runs, plan

CLIENT_PROCESSES = 2
WARMUP_CALLS = 5
CALLER_CORE, BACKEND_CORE = {0}, {1}  # the pinned layout
PINNED_GOAL = 20  # queue caller p99 this many times lower than the direct caller's


# --- run inside client processes -------------------------------------------------------


async def _mcp_clients(
    url: str, tool: str, clients: int, calls: int, interval_s: float
) -> tuple[list[float], float]:
    from mcp import Client

    latencies: list[float] = []

    def args() -> dict[str, Any]:
        if tool == "noop":
            return {}
        return {"task_run_id": str(uuid.uuid4()), "state": "RUNNING"}

    async def one_client() -> None:
        async with Client(url) as client:
            next_at = time.perf_counter()
            for index in range(WARMUP_CALLS + calls):
                if interval_s:  # an agent calling at its own pace, not as fast as it can
                    next_at += interval_s
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                started = time.perf_counter()
                result = await client.call_tool(tool, args())
                if index >= WARMUP_CALLS:
                    latencies.append(time.perf_counter() - started)
                assert not result.is_error, result.content

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies, time.perf_counter() - started


async def _direct_clients(
    api_url: str, runs: list[str], clients: int, calls: int
) -> tuple[list[float], float]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import State, StateType

    latencies: list[float] = []

    async def one_client(offset: int) -> None:
        async with PrefectClient(api_url, httpx_settings={"timeout": 120}) as client:
            for index in range(calls):
                run = runs[(offset * calls + index) % len(runs)]
                started = time.perf_counter()
                await client.set_task_run_state(
                    uuid.UUID(run), State(type=StateType.RUNNING), force=True
                )
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return latencies, time.perf_counter() - started


def _client_process(job: dict[str, Any]) -> tuple[list[float], float]:
    if job["kind"] == "direct":
        coro = _direct_clients(job["api_url"], job["runs"], job["clients"], job["calls"])
    else:
        coro = _mcp_clients(
            job["url"], job["kind"], job["clients"], job["calls"], job.get("interval_s", 0.0)
        )
    return asyncio.run(coro)


# --- orchestration ------------------------------------------------------------------------


def measure(pool: ProcessPoolExecutor, job: dict[str, Any], label: str) -> dict[str, Any]:
    """Run `job["clients"]` clients spread over the client processes; one result row."""
    processes = min(CLIENT_PROCESSES, job["clients"])
    share = [
        job["clients"] // processes + (i < job["clients"] % processes) for i in range(processes)
    ]
    futures = [pool.submit(_client_process, {**job, "clients": n}) for n in share]
    latencies: list[float] = []
    rate = 0.0
    for future in futures:
        values, seconds = future.result()
        latencies += values
        rate += len(values) / seconds  # the processes run side by side: rates add up
    return {
        "mode": label,
        "clients": job["clients"],
        "calls": len(latencies),
        "calls_per_s": round(rate, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
    }


def chart(rows: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for mode, style in (("queue", "o-"), ("noop", "s--"), ("direct", "^-")):
        points = [r for r in rows if r["mode"] == mode]
        for ax, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
            ax.plot([r["clients"] for r in points], [r[key] for r in points], style, label=mode)
    for ax, key in zip(axes, ("p50", "p99"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1, 10, 50], ["1", "10", "50"])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(f"{key} latency per call (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle("B1: set_task_run_state through the queue vs the MCP no-op vs calling Prefect")
    fig.tight_layout()
    path = RESULTS / "b1_latency.png"
    fig.savefig(path, dpi=110)
    return path


async def main() -> None:
    report = Report("b1_caller_latency", "python bench/b1_caller_latency.py")
    calls = {1: 400, 10: 100, 50: 30}
    rows: list[dict[str, Any]] = []
    # Room for two measurements side by side (the saturated rows).
    pool = ProcessPoolExecutor(2 * CLIENT_PROCESSES, mp_context=get_context("spawn"))
    with bench_stack() as stack, pool:
        api_url = stack.prefect.api_url
        runs = await create_task_runs(api_url, 450)  # 400 for the burst, 50 for direct calls
        _, url = stack.frontend("frontend", bench_noop_tool="true")
        for clients, count in calls.items():
            base = {"url": url, "clients": clients, "calls": count}
            rows.append(measure(pool, {**base, "kind": "set_task_run_state"}, "queue"))
            rows.append(measure(pool, {**base, "kind": "noop"}, "noop"))
            direct = {"kind": "direct", "api_url": api_url, "runs": runs, "clients": clients}
            rows.append(measure(pool, {**direct, "calls": max(count // 4, 10)}, "direct"))
        table(rows, list(rows[0]))
        saturated = await saturated_rows(stack, pool, url, runs)
        table(saturated, list(saturated[0]))
        pinned = await pinned_rows(stack, url, runs)
        table(pinned, list(pinned[0]))
        scale = scale_out_rows(stack, pool, url)
        table(scale, list(scale[0]))
    report.sections |= {"rows": rows, "saturated": saturated, "pinned": pinned, "scale_out": scale}
    judge(report, rows, saturated, scale)
    queue, direct = pinned
    ratio = direct["p99_ms"] / queue["p99_ms"]
    report.goal(
        f"Prefect saturated, pinned: caller p99 >= {PINNED_GOAL}x lower than the direct call's",
        ratio >= PINNED_GOAL,
        f"{queue['p99_ms']} ms vs {direct['p99_ms']} ms: {ratio:.0f}x",
    )
    print(f"chart: {chart(rows).relative_to(RESULTS.parent.parent)}")
    report.save()


def pin(pids: Iterable[int], cpus: set[int]) -> None:
    """Every thread of these processes and their descendants on `cpus` (`taskset -a -p`)."""
    for pid in process_tree(pids):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except (ProcessLookupError, PermissionError):
                continue  # ended meanwhile


async def pinned_rows(stack: Any, url: str, runs: list[str]) -> list[dict[str, Any]]:
    """The saturated phase with callers and backend on separate cores."""
    everything = set(range(os.cpu_count() or 1))
    backend = [stack.prefect.proc.pid, stack.redis.proc.pid]
    frontend = [child.proc.pid for child in stack.children if child.name == "frontend"]
    pool = ProcessPoolExecutor(
        2 * CLIENT_PROCESSES,
        mp_context=get_context("spawn"),
        initializer=os.sched_setaffinity,
        initargs=(0, CALLER_CORE),
    )
    pin(backend, BACKEND_CORE)
    pin(frontend, CALLER_CORE)
    try:
        with pool:
            rows = await saturated_rows(
                stack, pool, url, runs, label="pinned", worker_cores=BACKEND_CORE
            )
    finally:
        pin([*backend, *frontend], everything)
    return rows


async def saturated_rows(
    stack: Any,
    pool: ProcessPoolExecutor,
    url: str,
    runs: list[str],
    *,
    label: str = "shared",
    worker_cores: set[int] | None = None,
) -> list[dict[str, Any]]:
    """Queue and direct callers side by side while 2 workers drain a 2,000-change burst."""
    from mcp import Client
    from redis.asyncio import Redis

    from worker.fleet_stats import STATS_KEY, FleetCounts

    redis = Redis.from_url(stack.redis.url())
    await redis.flushdb()  # drop the unapplied changes of the rows before
    workers = stack.workers([f"drain-{label}-{i}" for i in range(2)])
    if worker_cores is not None:
        pin([w.proc.pid for w in workers], worker_cores)
    burst = plan(runs[:400], 5, seed=7)
    async with Client(url) as client:
        for start in range(0, len(burst), 1000):
            result = await client.call_tool(
                "submit_state_changes", {"changes": burst[start : start + 1000]}
            )
            assert not result.is_error, result.content
    applied_before = FleetCounts.from_hash(await redis.hgetall(STATS_KEY)).totals["applied"]
    loop = asyncio.get_running_loop()
    queue = loop.run_in_executor(
        None,
        measure,
        pool,
        {
            "kind": "set_task_run_state",
            "url": url,
            "clients": 10,
            "calls": 50,
            "interval_s": 0.2,
        },
        f"queue, Prefect saturated, {label} cores",
    )
    direct = loop.run_in_executor(
        None,
        measure,
        pool,
        {
            "kind": "direct",
            "api_url": stack.prefect.api_url,
            "runs": runs[400:],
            "clients": 10,
            "calls": 15,
        },
        f"direct, Prefect saturated, {label} cores",
    )
    rows = [await queue, await direct]
    applied = FleetCounts.from_hash(await redis.hgetall(STATS_KEY)).totals["applied"]
    applied -= applied_before
    await redis.aclose()
    for worker in workers:
        stack.stop_child(worker)
    for row in rows:
        row["burst_applied_meanwhile"] = applied
    return rows


def scale_out_rows(stack: Any, pool: ProcessPoolExecutor, url: str) -> list[dict[str, Any]]:
    """50 clients against 1 frontend process and against 2 on one port."""
    rows = []
    _, url2 = stack.frontend("frontend-2p", processes=2, bench_noop_tool="true")
    for label, target in (("1 process", url), ("2 processes", url2)):
        job = {"kind": "set_task_run_state", "url": target, "clients": 50, "calls": 30}
        rows.append(measure(pool, job, f"queue, {label}"))
    return rows


def judge(
    report: Report,
    rows: list[dict[str, Any]],
    saturated: list[dict[str, Any]],
    scale: list[dict[str, Any]],
) -> None:
    by = {(r["mode"], r["clients"]): r for r in rows}
    one = by[("queue", 1)]
    report.goal("p50 <= 5 ms at 1 client", one["p50_ms"] <= 5, f"p50 {one['p50_ms']} ms")
    for clients in (10, 50):
        queue, noop = by[("queue", clients)], by[("noop", clients)]
        p99_ratio = queue["p99_ms"] / noop["p99_ms"]
        rate_ratio = queue["calls_per_s"] / noop["calls_per_s"]
        report.goal(
            f"{clients} clients: p99 <= 1.5x and calls/s >= 0.8x the no-op tool's",
            p99_ratio <= 1.5 and rate_ratio >= 0.8,
            f"p99 {p99_ratio:.2f}x, calls/s {rate_ratio:.2f}x",
        )
    queue, direct = saturated
    ratio = direct["p99_ms"] / queue["p99_ms"]
    report.goal(
        "Prefect saturated: caller p99 >= 50x lower than the direct call's",
        ratio >= 50,
        f"{queue['p99_ms']} ms vs {direct['p99_ms']} ms: {ratio:.0f}x",
    )
    one_p, two_p = scale
    report.sections["scale_out_ratio"] = round(two_p["calls_per_s"] / one_p["calls_per_s"], 2)
    print(f"2 frontend processes: {report.sections['scale_out_ratio']}x the calls/s of 1")


if __name__ == "__main__":
    asyncio.run(main())
