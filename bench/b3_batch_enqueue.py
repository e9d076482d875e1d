"""B3 batch enqueue: changes/s through `submit_state_changes` at batch sizes 1, 100 and 1,000.

What is measured: how many state changes per second the MCP frontend accepts
and queues, end to end: the official MCP client (`mcp.Client`) calls
`submit_state_changes` over streamable HTTP on a `pmq serve` process, which
validates the changes and enqueues them in Redis with one Lua script per call.
No worker runs, so nothing but the enqueue is measured, and the run ids are
random UUIDs (nothing reaches Prefect; the tools accept any well-formed UUID).

How: Redis is started fresh (no Prefect server: nothing calls it) and emptied
before every row, so each row starts from an empty queue. Each client makes
one untimed warm-up call (it also lists the tools), then all clients start
together; a row's rate is its changes over the wall time from the first start
to the last answer, and its latencies are per call. Rows:

- `set_task_run_state`, one change per call: the baseline a batch is worth
  comparing with (as many changes as the batch-1 row);
- `submit_state_changes` at each batch size, from 1 client and from
  several concurrent clients (one sequential client leaves the server idle
  while it encodes and checks each answer);
- `submit_state_changes` at 1,000 with the client's output-schema check
  skipped: the SDK client validates every result against the tool's output
  schema with `jsonschema`, client CPU that is not the server's;
- `submit_state_changes` at 1,000 on a second frontend left at the default
  log level, INFO, which writes one JSON line per accepted change (the
  harness runs its children at WARNING, as every other row does);
- a plain JSON-RPC client (see below) with 1 and 4 connections, and with 4
  against `pmq serve --processes 2`;
- `JobStore.enqueue_many` in this process, the same batches with no MCP, no
  HTTP and no validation: the floor the server cannot go below.

Each row also gives the CPU time the frontend process (this process, for the
in-process rows) and Redis used per 1,000 changes, read from /proc: unlike
changes/s, it hardly depends on the client sharing the cores.

Then "where the time goes": each server-side step of one 1,000-change call
timed in this process (median of several), the Lua script's time from Redis'
own `INFO commandstats`, the client's schema check, and the rest (MCP
framing, HTTP, JSON both ways) by difference from the measured latency.

The goal (>= 20,000 changes/s at batch size 1,000) is judged on the best
1,000-change row over MCP: the SDK client as it comes, or a plain JSON-RPC
client (httpx POSTing the same `tools/call` requests, the load generator a
server benchmark would use, since the SDK client's own CPU competes with the
server for the same two cores), against 1 or 2 (`--processes 2`) frontend
processes.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from mcp import Client
from pydantic import TypeAdapter
from redis.asyncio import Redis

from bench.harness import BenchStack, Report, cpu_seconds, percentile, table
from mcp_frontend.devstack import Service
from mcp_frontend.server import ChangeIn, TicketList
from worker.contract import JobRecord, JobTicket, StateChange, utcnow
from worker.store import JobStore

GOAL_CHANGES_PER_S = 20_000
SIZES = (1, 100, 1_000)
# Calls per row: the batch-1 rows are latency-bound and cheap, the big batches
# are few but carry most changes; together about a minute on 2 busy cores.
CALLS = {1: 1_000, 100: 100, 1_000: 30}
CONCURRENT_CLIENTS = 4
STATE = "RUNNING"
DEADLINE_S = 3_600.0  # the default job deadline; only the records' TTL depends on it
COLUMNS = [
    "path",
    "batch",
    "clients",
    "batches",
    "changes",
    "seconds",
    "changes/s",
    "p50 ms",
    "p99 ms",
    "server cpu",
    "redis cpu",
]


@dataclass(frozen=True)
class Frontend:
    url: str
    pid: int


class CpuClock:
    """CPU seconds used since it was made, by the server (a pid, or this process) and Redis.

    Unlike changes/s, CPU per change hardly depends on who else uses the cores.
    """

    def __init__(self, server_pid: int | None, redis_pid: int) -> None:
        self.server_pid, self.redis_pid = server_pid, redis_pid
        self.start = self._read()

    def _read(self) -> tuple[float, float]:
        server = time.process_time() if self.server_pid is None else cpu_seconds(self.server_pid)
        return server, cpu_seconds(self.redis_pid)

    def elapsed(self) -> tuple[float, float]:
        server, redis = self._read()
        return server - self.start[0], redis - self.start[1]


@dataclass
class Row:
    path: str
    batch: int
    clients: int
    latencies_s: list[float]
    seconds: float
    cpu_s: tuple[float, float]  # the server's and Redis'

    def as_dict(self) -> dict[str, Any]:
        changes = self.batch * len(self.latencies_s)
        return {
            "path": self.path,
            "batch": self.batch,
            "clients": self.clients,
            "batches": len(self.latencies_s),
            "changes": changes,
            "seconds": round(self.seconds, 3),
            "changes/s": round(changes / self.seconds, 1),
            "p50 ms": round(percentile(self.latencies_s, 50) * 1000, 2),
            "p99 ms": round(percentile(self.latencies_s, 99) * 1000, 2),
            # CPU milliseconds per 1,000 changes
            "server cpu": round(self.cpu_s[0] * 1e6 / changes, 1),
            "redis cpu": round(self.cpu_s[1] * 1e6 / changes, 1),
        }


def raw_changes(size: int) -> list[dict[str, Any]]:
    return [{"run_type": "task", "run_id": str(uuid.uuid4()), "state": STATE} for _ in range(size)]


def batch_args(size: int) -> dict[str, Any]:
    return {"changes": raw_changes(size)}


def single_args(_: int) -> dict[str, Any]:
    return {"task_run_id": str(uuid.uuid4()), "state": STATE}


async def _skip_schema_check(name: str, result: Any) -> None:
    """Stands in for ClientSession.validate_tool_result, which has no switch of its own."""


async def mcp_row(
    frontend: Frontend,
    redis_pid: int,
    path: str,
    tool: str,
    make_args: Callable[[int], dict[str, Any]],
    *,
    batch: int,
    calls: int,
    clients: int,
    check_schema: bool = True,
) -> Row:
    """`calls` tool calls of `batch` changes, split over `clients` concurrent MCP clients."""
    shares = [calls // clients + (1 if i < calls % clients else 0) for i in range(clients)]
    async with AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(Client(frontend.url)) for _ in shares]
        for client in sessions:
            await client.call_tool(tool, make_args(batch))  # lists the tools too: untimed
            if not check_schema:
                client.session.validate_tool_result = _skip_schema_check  # type: ignore[method-assign]
        # Arguments are built before the clock starts, as an agent has them ready.
        work = [[make_args(batch) for _ in range(share)] for share in shares]
        cpu = CpuClock(frontend.pid, redis_pid)
        started = time.perf_counter()
        latencies = await asyncio.gather(
            *(timed_calls(client, tool, args) for client, args in zip(sessions, work, strict=True))
        )
        seconds = time.perf_counter() - started
        cpu_s = cpu.elapsed()
    return Row(path, batch, clients, [s for each in latencies for s in each], seconds, cpu_s)


async def raw_row(
    frontend: Frontend, redis_pid: int, path: str, *, calls: int, clients: int
) -> Row:
    """Batches of 1,000 sent as plain JSON-RPC `tools/call` POSTs over streamable HTTP.

    The same requests an MCP client sends to a stateless server, minus the SDK's
    client-side work (output-schema check, models): a load generator light enough
    that the server, not the client, sets the rate on a machine they share.
    """
    # The 2026-07-28 per-request envelope: answered as plain JSON (SSE only for
    # requests that get notifications, which these do not).
    headers = {
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "submit_state_changes",
    }
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    shares = [calls // clients + (1 if i < calls % clients else 0) for i in range(clients)]
    bodies = [
        [
            {
                "jsonrpc": "2.0",
                "id": index,
                "method": "tools/call",
                "params": {
                    "name": "submit_state_changes",
                    "arguments": batch_args(1_000),
                    "_meta": meta,
                },
            }
            for index in range(share)
        ]
        for share in shares
    ]

    async def one_client(http: httpx.AsyncClient, requests: list[dict[str, Any]]) -> list[float]:
        latencies = []
        for body in requests:
            before = time.perf_counter()
            response = await http.post(frontend.url, json=body, headers=headers)
            latencies.append(time.perf_counter() - before)
            result = response.raise_for_status().json()["result"]
            assert not result.get("isError"), result["content"]
            assert len(result["structuredContent"]["jobs"]) == 1_000
        return latencies

    async with httpx.AsyncClient(timeout=60) as http:
        warm = {**bodies[0][0], "id": -1}
        warm["params"] = {**warm["params"], "arguments": batch_args(1_000)}
        (await http.post(frontend.url, json=warm, headers=headers)).raise_for_status()
        cpu = CpuClock(frontend.pid, redis_pid)
        started = time.perf_counter()
        latencies = await asyncio.gather(*(one_client(http, b) for b in bodies))
        seconds = time.perf_counter() - started
        cpu_s = cpu.elapsed()
    return Row(path, 1_000, clients, [s for each in latencies for s in each], seconds, cpu_s)


async def timed_calls(client: Client, tool: str, calls: list[dict[str, Any]]) -> list[float]:
    latencies: list[float] = []
    for args in calls:
        before = time.perf_counter()
        result = await client.call_tool(tool, args)
        latencies.append(time.perf_counter() - before)
        if result.is_error:
            raise RuntimeError(f"{tool} failed: {result.content}")
    return latencies


def new_records(size: int) -> list[JobRecord]:
    now = utcnow()
    return [
        JobRecord.new(change, enqueued_at=now, deadline_s=DEADLINE_S, client_id="bench")
        for change in parse_changes(TypeAdapter(list[ChangeIn]).validate_python(raw_changes(size)))
    ]


def parse_changes(items: list[ChangeIn]) -> list[StateChange]:
    """What the tool does with each validated item (mcp_frontend.server._parse)."""
    return [
        StateChange.parse(
            run_type=item.run_type,
            run_id=item.run_id,
            state=item.state,
            message=item.message,
            force=item.force,
            idempotency_key=item.idempotency_key,
            max_message_chars=4_000,
        )
        for item in items
    ]


def new_store(redis: Redis) -> JobStore:
    return JobStore(redis, result_ttl_s=86_400, job_deadline_s=DEADLINE_S, max_queue_depth=100_000)


async def store_row(redis_url: str, redis_pid: int, *, batch: int, calls: int) -> Row:
    """The same batches through JobStore.enqueue_many in this process: no MCP, no HTTP."""
    redis = Redis.from_url(redis_url)
    try:
        store = new_store(redis)
        await store.enqueue_many(new_records(batch))  # loads the script: untimed
        batches = [new_records(batch) for _ in range(calls)]
        latencies: list[float] = []
        cpu = CpuClock(None, redis_pid)
        started = time.perf_counter()
        for records in batches:
            before = time.perf_counter()
            await store.enqueue_many(records)
            latencies.append(time.perf_counter() - before)
        seconds = time.perf_counter() - started
        cpu_s = cpu.elapsed()
    finally:
        await redis.aclose()
    return Row("JobStore.enqueue_many, in-process (no MCP)", batch, 1, latencies, seconds, cpu_s)


async def flush(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


async def measure_rows(
    redis_url: str, redis_pid: int, main: Frontend, info: Frontend, two: Frontend
) -> list[Row]:
    rows: list[Row] = []

    async def add(row: Awaitable[Row]) -> None:
        await flush(redis_url)  # every row starts from an empty queue
        rows.append(await row)
        print(f"  {rows[-1].path}, batch {rows[-1].batch} x{rows[-1].clients}: done", flush=True)

    await add(
        mcp_row(
            main,
            redis_pid,
            "set_task_run_state (one change per call)",
            "set_task_run_state",
            single_args,
            batch=1,
            calls=CALLS[1],
            clients=1,
        )
    )
    for size in SIZES:
        for clients in (1, CONCURRENT_CLIENTS):
            await add(
                mcp_row(
                    main,
                    redis_pid,
                    "submit_state_changes",
                    "submit_state_changes",
                    batch_args,
                    batch=size,
                    calls=CALLS[size],
                    clients=clients,
                )
            )
    await add(
        mcp_row(
            main,
            redis_pid,
            "submit_state_changes, client skips output-schema check",
            "submit_state_changes",
            batch_args,
            batch=1_000,
            calls=CALLS[1_000],
            clients=1,
            check_schema=False,
        )
    )
    await add(
        mcp_row(
            info,
            redis_pid,
            "submit_state_changes, frontend at log level INFO (the default)",
            "submit_state_changes",
            batch_args,
            batch=1_000,
            calls=CALLS[1_000],
            clients=1,
        )
    )
    for clients in (1, CONCURRENT_CLIENTS):
        await add(
            raw_row(main, redis_pid, "plain JSON-RPC client", calls=CALLS[1_000], clients=clients)
        )
    await add(
        raw_row(
            two,
            redis_pid,
            "plain JSON-RPC client, pmq serve --processes 2",
            calls=CALLS[1_000],
            clients=CONCURRENT_CLIENTS,
        )
    )
    for size in SIZES:
        await add(store_row(redis_url, redis_pid, batch=size, calls=CALLS[size]))
    return rows


def median_ms(step: Callable[[], object], repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        before = time.perf_counter()
        step()
        times.append(time.perf_counter() - before)
    return statistics.median(times) * 1000


async def lua_ms_per_call(redis: Redis) -> float:
    stats: dict[str, Any] = await redis.info("commandstats")
    return float(stats["cmdstat_evalsha"]["usec_per_call"]) / 1000


async def breakdown(redis_url: str, mcp_url: str, e2e_p50_ms: float) -> dict[str, float]:
    """Milliseconds per 1,000-change call, step by step (see the module docstring)."""
    size = 1_000
    raw = raw_changes(size)
    adapter = TypeAdapter(list[ChangeIn])
    items = adapter.validate_python(raw)
    changes = parse_changes(items)
    now = utcnow()
    steps: dict[str, float] = {
        "server: arguments -> ChangeIn (pydantic)": median_ms(lambda: adapter.validate_python(raw)),
        "server: StateChange.parse": median_ms(lambda: parse_changes(items)),
        "server: JobRecord.new": median_ms(
            lambda: [
                JobRecord.new(c, enqueued_at=now, deadline_s=DEADLINE_S, client_id="bench")
                for c in changes
            ]
        ),
    }
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushdb()
        store = new_store(redis)
        enqueued = await store.enqueue_many(new_records(size))
        await redis.config_resetstat()  # so usec_per_call covers the timed calls only
        batches = [new_records(size) for _ in range(5)]
        times = []
        for records in batches:
            before = time.perf_counter()
            await store.enqueue_many(records)
            times.append(time.perf_counter() - before)
        lua_ms = await lua_ms_per_call(redis)
    finally:
        await redis.aclose()
    steps["server: enqueue_many, Python (encode args, decode reply)"] = (
        statistics.median(times) * 1000 - lua_ms
    )
    steps["redis: the ENQUEUE Lua script"] = lua_ms
    steps["server: tickets (JobTicket.of, TicketList JSON)"] = median_ms(
        lambda: TicketList(jobs=[JobTicket.of(e.record) for e in enqueued]).model_dump_json()
    )
    steps["client: output-schema check (jsonschema)"] = await schema_check_ms(mcp_url, enqueued)
    steps["the rest: MCP framing, HTTP, JSON both ways (by difference)"] = e2e_p50_ms - sum(
        steps.values()
    )
    return {name: round(ms, 2) for name, ms in steps.items()}


async def schema_check_ms(mcp_url: str, enqueued: list[Any]) -> float:
    """The SDK client's own check of one 1,000-ticket answer against the output schema."""
    async with Client(mcp_url) as client:
        await client.list_tools()
        answer = TicketList(jobs=[JobTicket.of(e.record) for e in enqueued]).model_dump(mode="json")
        result = await client.call_tool("submit_state_changes", batch_args(1))
        # Same tool, same schema; only the structured content is swapped for the big answer.
        big = result.model_copy(update={"structured_content": answer})
        times = []
        for _ in range(5):
            before = time.perf_counter()
            await client.session.validate_tool_result("submit_state_changes", big)
            times.append(time.perf_counter() - before)
    return statistics.median(times) * 1000


@contextmanager
def redis_only_stack() -> Iterator[BenchStack]:
    """The harness' stack without its Prefect server, which nothing here calls."""
    with tempfile.TemporaryDirectory(prefix="pmq-bench-") as tmp:
        stack = BenchStack(Path(tmp))
        try:
            stack.redis.start_and_wait()
            yield stack
        finally:
            stack.stop()


def judge(report: Report, rows: list[dict[str, Any]]) -> None:
    """Judged on the best batch-1,000 row over MCP (SDK or plain JSON-RPC client)."""
    over_mcp = [
        r
        for r in rows
        if r["batch"] == 1_000
        and r["path"].startswith(("submit_state_changes", "plain"))
        and "INFO" not in r["path"]
    ]
    best = max(over_mcp, key=lambda r: r["changes/s"])
    sdk = max(
        (r for r in over_mcp if r["path"] == "submit_state_changes"), key=lambda r: r["changes/s"]
    )
    single = next(r for r in rows if r["path"].startswith("set_task_run_state"))
    floor = next(r for r in rows if r["path"].startswith("JobStore") and r["batch"] == 1_000)
    report.goal(
        f">= {GOAL_CHANGES_PER_S:,} changes/s through submit_state_changes at batch size 1,000",
        best["changes/s"] >= GOAL_CHANGES_PER_S,
        f"{best['changes/s']:,.0f}/s ({best['path']}, {best['clients']} client(s)); "
        f"SDK client {sdk['changes/s']:,.0f}/s; "
        f"{best['changes/s'] / single['changes/s']:.1f}x set_task_run_state one at a time "
        f"({single['changes/s']:,.0f}/s); in-process enqueue_many floor "
        f"{floor['changes/s']:,.0f}/s; the frontend used {best['server cpu']:.0f} CPU ms and "
        f"Redis {best['redis cpu']:.0f} per 1,000 changes",
    )


async def run(
    stack: BenchStack, main: Frontend, info: Frontend, two: Frontend, report: Report
) -> None:
    redis_url = stack.redis.url()
    redis_pid = _pid(stack.redis)
    measured = await measure_rows(redis_url, redis_pid, main, info, two)
    rows = [row.as_dict() for row in measured]
    print("\n(server cpu, redis cpu: CPU ms per 1,000 changes of the frontend process, or of")
    print(" this process for the in-process rows, and of Redis)")
    table(rows, COLUMNS)
    e2e = next(
        r["p50 ms"]
        for r in rows
        if r["path"] == "submit_state_changes" and r["batch"] == 1_000 and r["clients"] == 1
    )
    steps = await breakdown(redis_url, main.url, e2e)
    print(f"\nwhere the time goes, ms per 1,000-change call (1 client, p50 {e2e:.1f} ms):")
    table([{"step": name, "ms": ms} for name, ms in steps.items()], ["step", "ms"])
    report.sections["rows"] = rows
    report.sections["breakdown_ms_per_1000_changes"] = steps
    report.sections["settings"] = {
        "calls": CALLS,
        "concurrent_clients": CONCURRENT_CLIENTS,
        "frontend_processes": "1 unless the row says otherwise",
        "log_level": "WARNING unless the row says otherwise",
    }
    judge(report, rows)


def main() -> None:
    report = Report("b3_batch_enqueue", ".venv/bin/python bench/b3_batch_enqueue.py")
    with redis_only_stack() as stack:
        # The harness runs its children at log level WARNING; the second frontend
        # keeps the default (INFO: one JSON log line per accepted change).
        main_service, main_url = stack.frontend("frontend")
        info_service, info_url = stack.frontend("frontend-info", log_level="INFO")
        two_service, two_url = stack.frontend("frontend-2p", processes=2)
        main = Frontend(main_url, _pid(main_service))
        info = Frontend(info_url, _pid(info_service))
        two = Frontend(two_url, _pid(two_service))  # CPU read over the whole process tree
        asyncio.run(run(stack, main, info, two, report))
    report.save()


def _pid(service: Service) -> int:
    assert service.proc is not None, f"{service.name} is not running"
    return service.proc.pid


if __name__ == "__main__":
    main()
