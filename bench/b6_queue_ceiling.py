"""B6: the queue's own ceiling, with Prefect's cost taken out.

Starts its own Redis, `pmq serve` and a stand-in for Prefect's set_state
endpoint that ACCEPTs at once (bench/standin_prefect.py). For 1, 2 and 4
`pmq worker` processes: `--changes` changes over `--runs` runs are queued
first (workers stopped), then the workers start and drain them. Per drain:

- applied/s, from the first applied change to the last;
- CPU per applied change of the workers and the stand-in (from /proc) and of
  Redis (INFO cpu, which is Redis's own count);
(each over the same window: from when every worker is up to the last change)
- Redis commands per applied change (INFO commandstats, reset before each
  drain; commands that scripts run count one each, as Redis counts them);
- Redis's load: commands/s and the share of one core it used, from which the
  drain rate one Redis could carry is estimated (rate / busy share).

    .venv/bin/python bench/b6_queue_ceiling.py [--changes 20000 --runs 4000 --workers 1,2,4]

Paced (`--service-ms 8`): the stand-in serves one call at a time, 8 ms each,
asleep: a one-process Prefect's pace (~110/s) without its CPU. The queue's CPU
per change at that pace is what B2 judges, read here without Prefect on the
same cores; the baseline is a bare aiohttp client calling the same stand-in.

Rate-limited (`--prefect-max-rps 28`): the workers share that budget of Prefect
calls (PMQ_PREFECT_MAX_RPS), so calls wait for their turns; the Redis commands
and CPU per change show what waiting costs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis

from bench.b2_throughput import QUEUE_CPU_GOAL_MS, QUEUE_CPU_SPREAD, TERMINAL, submit, totals
from bench.harness import RESULTS, BenchStack, Report, bench_stack, cpu_seconds, table
from bench.workload import plan
from mcp_frontend.devstack import BIN_DIR, Service, free_port
from worker.fleet_stats import STATS_KEY

HERE = Path(__file__).resolve().parent
ONE_WORKER_GOAL_PER_S = 1_000
SCALE_GOAL = 1.5  # 4 workers vs 1, on 2 cores
COMMANDS_GOAL = 20
# A call's booking of the shared budget (worker.lua.RATE_LIMIT) is EVALSHA, TIME,
# GET and SET. Beyond those, waiting must cost nothing: no change refused its turn,
# requeued and taken again.
BOOKING_COMMANDS = 4


def start_standin(stack: BenchStack, service_ms: float = 0.0) -> Service:
    import httpx

    port = free_port()
    script = [
        str(HERE / "standin_prefect.py"),
        "--port",
        str(port),
        "--service-ms",
        str(service_ms),
    ]
    standin = Service(
        "standin-prefect",
        [str(BIN_DIR / "python"), *script],
        env={"PATH": str(BIN_DIR)},
        log_path=stack.tmp / "standin.log",
    )
    standin.start()
    stack.children.append(standin)

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    standin.wait_ready(up, 30)
    stack.api_url = f"http://127.0.0.1:{port}/api"
    return standin


async def redis_figures(redis: Redis) -> tuple[dict[str, int], float]:
    """Commands run since the last CONFIG RESETSTAT, by name, and Redis's CPU seconds."""
    stats = await redis.info("commandstats")
    commands = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    cpu = await redis.info("cpu")
    return commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def drain(
    stack: BenchStack,
    url: str,
    standin: Service,
    workers: int,
    changes: list[dict[str, Any]],
    **settings: Any,
) -> dict[str, Any]:
    redis = Redis.from_url(stack.redis.url())
    await redis.delete(STATS_KEY)
    await submit(url, changes)
    standin_pid = standin.proc.pid  # type: ignore[union-attr]
    children = stack.workers([f"b6-{workers}w-{i}" for i in range(workers)], **settings)
    pids = [w.proc.pid for w in children]  # type: ignore[union-attr]
    # Their start (imports, first heartbeat) is not the drain: count from when all are up.
    await redis.config_resetstat()
    _, redis_cpu_before = await redis_figures(redis)
    standin_before = cpu_seconds(standin_pid)
    worker_before = sum(map(cpu_seconds, pids))
    first = (time.perf_counter(), (await totals(redis)).get("applied", 0))
    polls = 1
    while True:
        now = await totals(redis)
        polls += 1
        if sum(now.get(k, 0) for k in TERMINAL) >= len(changes):
            break
        await asyncio.sleep(0.05)
    ended = time.perf_counter()
    worker_cpu = sum(map(cpu_seconds, pids)) - worker_before
    standin_cpu = cpu_seconds(standin_pid) - standin_before
    by_name, redis_cpu_after = await redis_figures(redis)
    # This bench's own: its INFO calls, and its polls of the totals (HGETALL).
    by_name.pop("info", None)
    by_name["hgetall"] = by_name.get("hgetall", 0) - polls
    commands = sum(by_name.values())
    redis_cpu = redis_cpu_after - redis_cpu_before
    final = await totals(redis)  # after the figures: not counted
    await redis.aclose()
    for child in children:
        stack.stop_child(child)
    applied = final.get("applied", 0)
    seconds = ended - first[0]
    counted = applied - first[1]
    assert counted > len(changes) / 2, "the workers drained most of the queue while starting"
    rate = counted / seconds
    busy = redis_cpu / seconds  # share of one core
    return {
        "workers": workers,
        "changes": len(changes),
        "not_applied": len(changes) - applied,
        "seconds": round(seconds, 2),
        "applied_per_s": round(rate, 1),
        "cpu_ms_worker": round(worker_cpu * 1000 / counted, 3),
        "cpu_ms_redis": round(redis_cpu * 1000 / counted, 3),
        "cpu_ms_queue": round((worker_cpu + redis_cpu) * 1000 / counted, 3),
        "cpu_ms_standin": round(standin_cpu * 1000 / counted, 3),
        "redis_commands_per_change": round(commands / counted, 1),
        "redis_commands_per_s": round(commands / seconds),
        "redis_core_share": round(busy, 2),
        "redis_ceiling_per_s": round(rate / busy) if busy > 0 else None,
        "redis_commands_by_name": {
            name: round(calls / counted, 2)
            for name, calls in sorted(by_name.items(), key=lambda item: -item[1])
        },
    }


async def bare_client(api_url: str, calls: int, concurrency: int) -> dict[str, Any]:
    """The paced run's baseline: a bare aiohttp loop of set_state calls, nothing else.

    What any Python client pays per call at this pace on this machine (this process's
    own CPU over those calls, its children not counted): a process woken from idle for
    every answer.
    """
    import aiohttp

    def own_cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    body = json.dumps({"state": {"type": "RUNNING"}, "force": True}).encode()
    headers = {"content-type": "application/json"}
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            async with gate:
                url = f"{api_url}/task_runs/{uuid.uuid4()}/set_state"
                async with session.post(url, data=body, headers=headers) as answer:
                    await answer.read()

        await one()  # its connection
        before = own_cpu_s()
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(calls)))
        seconds = time.perf_counter() - started
        cpu = own_cpu_s() - before
    return {
        "mode": f"bare aiohttp client, {concurrency} in flight",
        "calls": calls,
        "calls_per_s": round(calls / seconds, 1),
        "cpu_ms_client": round(cpu * 1000 / calls, 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=4_000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument(
        "--service-ms",
        type=float,
        default=0.0,
        help="paced: the stand-in serves one call at a time, each this long (asleep)",
    )
    parser.add_argument(
        "--prefect-max-rps",
        type=float,
        default=None,
        help="rate-limited: the workers share this budget of calls (PMQ_PREFECT_MAX_RPS)",
    )
    args = parser.parse_args()
    steps = args.changes // args.runs
    command = "python bench/b6_queue_ceiling.py " + " ".join(sys.argv[1:])
    name = "b6_queue_paced" if args.service_ms else "b6_queue_ceiling"
    settings = {}
    if args.prefect_max_rps:
        name, settings = "b6_queue_rate_limited", {"prefect_max_rps": args.prefect_max_rps}
    report = Report(name, command)
    rows: list[dict[str, Any]] = []
    with bench_stack(prefect=False) as stack:
        standin = start_standin(stack, args.service_ms)
        _, url = stack.frontend("frontend")
        if args.service_ms:
            baseline = [await bare_client(stack.api_url, 1000, c) for c in (1, 4)]
            table(baseline, list(baseline[0]))
            report.sections["bare_client"] = baseline
        runs = [str(uuid.uuid4()) for _ in range(args.runs)]
        for seed, workers in enumerate(map(int, args.workers.split(",")), start=600):
            changes = plan(runs, steps, seed)
            rows.append(await drain(stack, url, standin, workers, changes, **settings))
            print(rows[-1], flush=True)
    table(rows, list(rows[0]))
    report.sections["rows"] = rows
    if settings:
        commands_goal(report, rows, extra=BOOKING_COMMANDS)
    elif args.service_ms:
        paced_goals(report, rows)
    else:
        ceiling_goals(report, rows)
    report.save()
    print(f"results: {(RESULTS / (name + '.json')).relative_to(RESULTS.parent.parent)}")


def paced_goals(report: Report, rows: list[dict[str, Any]]) -> None:
    """At a Prefect-like rate: the queue's CPU per change, as B2 judges it."""
    cpu = [row["cpu_ms_queue"] for row in rows]
    mean = sum(cpu) / len(cpu)
    report.goal(
        f"queue CPU <= {QUEUE_CPU_GOAL_MS} ms per change at a paced rate",
        max(cpu) <= QUEUE_CPU_GOAL_MS,
        ", ".join(f"{row['workers']}w: {row['cpu_ms_queue']:.2f} ms" for row in rows),
    )
    report.goal(
        f"queue CPU within +-{QUEUE_CPU_SPREAD:.0%} across worker counts",
        all(abs(c - mean) <= QUEUE_CPU_SPREAD * mean for c in cpu),
        f"{min(cpu):.2f}-{max(cpu):.2f} ms",
    )


def commands_goal(report: Report, rows: list[dict[str, Any]], *, extra: int = 0) -> None:
    commands = max(row["redis_commands_per_change"] for row in rows)
    goal = COMMANDS_GOAL + extra
    what = f" ({COMMANDS_GOAL}, plus the booking's {extra})" if extra else ""
    report.goal(
        f"<= {goal} Redis commands per applied change{what}",
        commands <= goal,
        f"up to {commands:.1f}",
    )


def ceiling_goals(report: Report, rows: list[dict[str, Any]]) -> None:
    by_workers = {row["workers"]: row for row in rows}
    one = by_workers.get(1)
    if one:
        report.goal(
            f"1 worker applies >= {ONE_WORKER_GOAL_PER_S}/s",
            one["applied_per_s"] >= ONE_WORKER_GOAL_PER_S and one["not_applied"] == 0,
            f"{one['applied_per_s']:.0f}/s",
        )
    ordered = sorted(by_workers)
    report.goal(
        "more workers never apply less than fewer",
        all(
            by_workers[b]["applied_per_s"] >= by_workers[a]["applied_per_s"]
            for a, b in itertools.pairwise(ordered)
        ),
        ", ".join(f"{n}: {by_workers[n]['applied_per_s']:.0f}/s" for n in ordered),
    )
    if one and 4 in by_workers:
        ratio = by_workers[4]["applied_per_s"] / one["applied_per_s"]
        report.goal(f"4 workers >= {SCALE_GOAL}x one", ratio >= SCALE_GOAL, f"{ratio:.2f}x")
    commands_goal(report, rows)


if __name__ == "__main__":
    asyncio.run(main())
