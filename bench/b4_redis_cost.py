"""B4 Redis cost: commands, bytes and memory per job, and whether memory comes back.

What is measured, all from Redis' own counters (`INFO commandstats`,
`total_net_input_bytes` / `total_net_output_bytes`, `used_memory`), as
deltas over windows in which only the measured actor talks to Redis:

- enqueue, by the frontend: 5,000 changes through `submit_state_changes` in
  batches of 100, and one change per `set_task_run_state` call;
- apply, by one `pmq worker` (the take and transition scripts, lease
  renewals, heartbeats, arq's health-check key) from its start until every
  job is terminal; the two scripts' share is measured by calling them in this
  process on a scratch database (one take per job here, where a busy worker
  takes several at once), and the rest is the worker's other commands;
- `get_job` polling: one `get_job` (no wait) per pending job;
- an idle worker, per second (it looks for due jobs every
  PMQ_WORKER_POLL_DELAY_S even when there is nothing to do);
- memory per pending job: `used_memory` after 5,000 queued jobs (no worker
  runs; random run ids, since they never reach Prefect) minus before, less
  the latency histograms Redis 7 allocates (~24 KB each, measured here with
  a first ECHO) the first time it sees a command name; with MEMORY USAGE and
  the encoding of each kind of key, and of a finished record; those jobs
  live in database 1 and are flushed after;
- expiry: 600 jobs are applied to real Prefect task runs with
  PMQ_RESULT_TTL_S=5 and PMQ_JOB_DEADLINE_S=60 (a run's ordering key lives
  as long as a pending job could: deadline + result TTL after the enqueue);
  then, with the worker and frontend stopped, the key count is polled until
  only the fleet-wide counters are left, and `used_memory` is compared with
  the baseline taken before the first enqueue, both taken while the bench's
  connection is Redis' only one. The goal's tolerance is what is explained
  and not per job: the latency histograms of command names first seen
  since, the fleet counters (`pmq:stats:moves`, kept a week), the change in
  the bench connection's own memory (Redis resizes its reply buffer), and
  8 KiB for Redis' keyspace tables and slow log (see REDIS_SLACK). Also
  shown after `MEMORY PURGE`, which hands the allocator's free pages back
  to the OS: it changes RSS, not used_memory (which grows by one more
  histogram, MEMORY PURGE's own).

The bench's own INFO calls are subtracted exactly: it counts the bytes of
its requests and replies on its single connection. Every key is checked for
a TTL after enqueue, after apply and at the end: a key without one is a leak.

    .venv/bin/python bench/b4_redis_cost.py
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from mcp import Client
from redis.asyncio import Redis as AsyncRedis

from bench.harness import BenchStack, Report, bench_stack, table
from mcp_frontend.devstack import Service, pmq_service
from tests.prefect_runs import PrefectRuns
from worker import lua
from worker.contract import (
    QUEUE_KEY,
    JobRecord,
    Orchestration,
    RunType,
    StateChange,
    StateType,
    Status,
    utcnow,
)
from worker.fleet_stats import STATS_KEY, FleetCounts
from worker.store import JobStore

PENDING_JOBS = 5_000
PENDING_BATCH = 100
APPLY_JOBS = 600  # SQLite Prefect takes ~60 writes/s: creating and applying take ~10 s each
GET_JOB_CALLS = 1_000
RESULT_TTL_S = 5
JOB_DEADLINE_S = 60
IDLE_WINDOW_S = 3.0  # how long the idle worker's polling is counted, to give a rate
SCRIPT_CALLS = 50  # claim/transition calls made in-process to split the apply cost
PENDING_DB, SCRATCH_DB = 1, 2
# Counters kept for /metrics, one hash for the whole fleet, a week past the last change.
FLEET_KEYS = {STATS_KEY}
INFO_SECTIONS = ("memory", "stats", "clients", "commandstats", "latencystats", "keyspace")
# Slack for the memory goal: Redis' own bookkeeping, neither per job nor growing: the
# keyspace's hash tables (shrunk by a cron only once under 10% full; ~1.2 KB seen) and
# slow-log entries (at most 128; a slow EVALSHA keeps up to 32 arguments of 128 B).
REDIS_SLACK = 8 * 1024
# The queue has no TTL by design: a job's end removes it, and Redis deletes an empty
# sorted set.
NO_TTL_BY_DESIGN = {QUEUE_KEY}

ENQUEUE_BATCH = f"enqueue, batches of {PENDING_BATCH} (frontend)"
ENQUEUE_ONE = "enqueue, one per call (frontend)"
APPLY = "apply (worker, from its start)"
CLAIM = "  of which: take script (claims)"
TRANSITION = "  of which: transition script"
REST = "  of which: the rest (leases, heartbeat, polls)"
GET_JOB = "get_job, no wait (frontend)"
IDLE = "idle worker, per second"
# Each phase, and its column in the per-command table.
PHASES = {
    ENQUEUE_BATCH: f"enq x{PENDING_BATCH}",
    ENQUEUE_ONE: "enq x1",
    APPLY: "apply",
    CLAIM: "claim",
    TRANSITION: "transition",
    REST: "rest",
    GET_JOB: "get_job",
    IDLE: "idle/s",
}


@dataclass(frozen=True)
class Snapshot:
    """One INFO reply, plus this connection's own traffic up to it."""

    fields: dict[str, str]
    commands: dict[str, int]
    histograms: int  # command names Redis keeps a latency histogram for
    own_sent: int
    own_received: int
    own_info_calls: int
    # The meter connection's own memory in Redis, when asked (see sole_client_snapshot).
    own_memory: int = 0

    def num(self, name: str) -> int:
        return int(self.fields[name])


@dataclass
class Cost:
    """What happened in Redis between two snapshots, the bench's own calls taken out."""

    commands: dict[str, int]
    bytes_in: int
    bytes_out: int
    histograms: int
    memory: int

    @property
    def total_commands(self) -> int:
        return sum(self.commands.values())

    def per(self, count: float) -> dict[str, float]:
        return {
            "commands": round(self.total_commands / count, 2),
            "bytes in": round(self.bytes_in / count, 1),
            "bytes out": round(self.bytes_out / count, 1),
        }


class Meter:
    """INFO snapshots on one connection that counts its own bytes.

    Redis counts a request's bytes before running it and a reply's after, so
    a window [a, b] holds a's reply, b's request, and any polls in between:
    exactly what `own_sent`/`own_received` differ by.
    """

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.client.set_response_callback("INFO", lambda raw, **_: raw)  # keep the wire bytes
        self.client.ping()  # connect (and its handshake) before any window
        self.sent = self.received = self.info_calls = 0

    def snapshot(self) -> Snapshot:
        args = [b"INFO", *(s.encode() for s in INFO_SECTIONS)]
        self.sent += len(_resp_command(args))
        raw: bytes = self.client.execute_command(*args)
        snap = _parse_info(raw, self.sent, self.received, self.info_calls)
        self.received += len(b"$%d\r\n" % len(raw)) + len(raw) + 2
        self.info_calls += 1
        return snap

    def own_memory(self) -> int:
        """This connection's memory in Redis (buffers included), from CLIENT INFO."""
        return int(self.client.client_info()["tot-mem"])

    def cost(self, a: Snapshot, b: Snapshot) -> Cost:
        commands = {
            name: b.commands.get(name, 0) - a.commands.get(name, 0)
            for name in b.commands
            if b.commands.get(name, 0) != a.commands.get(name, 0)
        }
        commands["info"] = commands.get("info", 0) - (b.own_info_calls - a.own_info_calls)
        return Cost(
            commands={k: v for k, v in commands.items() if v},
            bytes_in=b.num("total_net_input_bytes")
            - a.num("total_net_input_bytes")
            - (b.own_sent - a.own_sent),
            bytes_out=b.num("total_net_output_bytes")
            - a.num("total_net_output_bytes")
            - (b.own_received - a.own_received),
            histograms=b.histograms - a.histograms,
            memory=b.num("used_memory") - a.num("used_memory"),
        )


def _resp_command(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _parse_info(raw: bytes, sent: int, received: int, info_calls: int) -> Snapshot:
    fields: dict[str, str] = {}
    commands: dict[str, int] = {}
    histograms = 0
    for line in raw.decode().splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            continue
        if name.startswith("cmdstat_"):
            commands[name.removeprefix("cmdstat_")] = int(value.split(",")[0].split("=")[1])
        elif name.startswith("latency_percentiles_usec_"):
            histograms += 1
        else:
            fields[name] = value
    return Snapshot(fields, commands, histograms, sent, received, info_calls)


@dataclass
class Findings:
    """Everything measured, for the tables, the goals and the JSON."""

    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    commands: dict[str, dict[str, float]] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    keys_without_ttl: dict[str, list[str]] = field(default_factory=dict)
    expiry: dict[str, Any] = field(default_factory=dict)

    def add(self, phase: str, cost: Cost, count: float) -> None:
        self.costs[phase] = {"count": count, **cost.per(count)}
        self.commands[phase] = {
            name: round(calls / count, 2) for name, calls in sorted(cost.commands.items())
        }

    def derive_rest(self) -> None:
        """Apply minus the two scripts: arq's bookkeeping and the worker's own calls."""
        self.costs[REST] = {
            k: round(v - self.costs[CLAIM][k] - self.costs[TRANSITION][k], 2)
            for k, v in self.costs[APPLY].items()
        }
        names = set(self.commands[APPLY]) | set(self.commands[CLAIM])
        names |= set(self.commands[TRANSITION])
        rest = {
            n: round(
                self.commands[APPLY].get(n, 0)
                - self.commands[CLAIM].get(n, 0)
                - self.commands[TRANSITION].get(n, 0),
                2,
            )
            for n in sorted(names)
        }
        self.commands[REST] = {n: v for n, v in rest.items() if v}


# --- setup -------------------------------------------------------------------------------


def preload_scripts(client: redis.Redis) -> None:
    """Cache every script now: the script cache is per server, not per job."""
    for script in (lua.ENQUEUE, lua.TAKE, lua.DUE, lua.CLAIM, lua.TRANSITION, lua.RATE_LIMIT):
        client.script_load(script)


def histogram_bytes(meter: Meter) -> int:
    """What one latency histogram costs, from the first ECHO (nothing else sends ECHO).

    Redis 7 allocates one per command name the first time it runs, unless
    latency tracking is off.
    """
    meter.snapshot()  # INFO's own histogram, if this is the first INFO
    before = meter.snapshot()
    meter.client.echo("calibration")
    after = meter.snapshot()
    new = after.histograms - before.histograms
    return (after.num("used_memory") - before.num("used_memory")) // new if new else 0


def start_worker(stack: BenchStack, name: str, **settings: Any) -> Service:
    """`pmq worker`, without the harness' readiness wait: its SCANs would land in the window."""
    child = pmq_service(
        name, ["worker"], env=stack.env(**settings), log_path=stack.tmp / f"{name}.log"
    )
    child.start()
    stack.children.append(child)
    return child


async def sole_client_snapshot(meter: Meter) -> Snapshot:
    """A snapshot once the meter is Redis' only client, with the meter's own memory.

    Each connection holds memory, and Redis frees a closed one only when it
    next reads from it. The meter's own reply buffer is resized by Redis
    (1 to 16 KiB, by recent use), so it is measured rather than assumed.
    """

    def alone() -> bool:
        return meter.snapshot().num("connected_clients") == 1

    await wait_for(alone, 10, "other clients gone")
    own = meter.own_memory()
    return replace(meter.snapshot(), own_memory=own)


async def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:g} s")
        await asyncio.sleep(0.1)


# --- keys ----------------------------------------------------------------------------------


def keys_without_ttl(client: redis.Redis) -> list[str]:
    names = [k.decode() for k in client.scan_iter(count=1_000)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.pttl(name)
    ttls = pipe.execute()
    return sorted(
        n for n, ttl in zip(names, ttls, strict=True) if ttl == -1 and n not in NO_TTL_BY_DESIGN
    )


def key_kind(name: str) -> str:
    """`pmq:job:<id>` -> `pmq:job:*`: the key's family, for counting."""
    head, _, tail = name.rpartition(":")
    return f"{head}:*" if len(tail) >= 32 else name


def remaining_keys(client: redis.Redis) -> list[dict[str, Any]]:
    return [
        {
            "key": k.decode(),
            "ttl s": round(client.pttl(k) / 1000),
            "bytes": client.memory_usage(k, samples=0),
        }
        for k in sorted(client.scan_iter(count=1_000))
    ]


def memory_by_kind(client: redis.Redis, jobs: int) -> list[dict[str, Any]]:
    """MEMORY USAGE per job by key family: one sample key each, shared keys divided by `jobs`.

    The encoding matters: a hash with a value over `hash-max-listpack-value`
    (64 bytes) is a hashtable, two to three times the size of a listpack.
    """
    samples: dict[str, bytes] = {}
    for name in client.scan_iter(count=1_000):
        samples.setdefault(key_kind(name.decode()), name)
    rows = []
    for kind, name in sorted(samples.items()):
        size = client.memory_usage(name, samples=0) or 0
        shared = kind == name.decode()  # one key for all jobs (the queue, the counters)
        rows.append(
            {
                "key": kind,
                "bytes per job": round(size / jobs, 1) if shared else size,
                "encoding": client.object("encoding", name).decode(),
                "longest value": _longest_value(client, name),
            }
        )
    return rows


def _longest_value(client: redis.Redis, name: bytes) -> str:
    """A hash's longest field value, which decides its encoding; '' for other types."""
    if client.type(name) != b"hash":
        return ""
    field, value = max(client.hgetall(name).items(), key=lambda item: len(item[1]))
    return f"{field.decode()} ({len(value)} B)"


# --- phases --------------------------------------------------------------------------------


def pending_change() -> dict[str, Any]:
    return {"run_type": "task", "run_id": str(uuid.uuid4()), "state": "RUNNING"}


async def enqueue_pending(url: str) -> list[str]:
    """PENDING_JOBS changes in batches of PENDING_BATCH; returns the job ids."""
    ids: list[str] = []
    async with Client(url) as client:
        for _ in range(PENDING_JOBS // PENDING_BATCH):
            changes = [pending_change() for _ in range(PENDING_BATCH)]
            result = await client.call_tool("submit_state_changes", {"changes": changes})
            ids += [t["job_id"] for t in _ok(result)["jobs"]]
    return ids


async def poll_jobs(url: str, job_ids: list[str]) -> None:
    async with Client(url) as client:
        await client.list_tools()  # the client would list them on its first call anyway
        for job_id in job_ids:
            _ok(await client.call_tool("get_job", {"job_id": job_id}))


async def enqueue_singles(url: str, run_ids: list[str]) -> None:
    async with Client(url) as client:
        for run_id in run_ids:
            _ok(
                await client.call_tool(
                    "set_task_run_state", {"task_run_id": run_id, "state": "RUNNING"}
                )
            )


def _ok(result: Any) -> dict[str, Any]:
    if result.is_error or result.structured_content is None:
        raise RuntimeError(f"tool call failed: {result.content}")
    return dict(result.structured_content)


async def measure_pending(
    stack: BenchStack, meter: Meter, hist_bytes: int, findings: Findings
) -> None:
    """5,000 queued jobs in database 1: enqueue cost, memory, get_job cost; then flushed."""
    frontend, url = stack.frontend("frontend-pending", redis_url=stack.redis.url(PENDING_DB))
    before = meter.snapshot()
    job_ids = await enqueue_pending(url)
    after = meter.snapshot()
    cost = meter.cost(before, after)
    findings.add(ENQUEUE_BATCH, cost, PENDING_JOBS)
    # First-seen command names get a latency histogram: a per-server cost, not a job's.
    # (The frontend's one new connection, ~20 KB, is left in: 4 bytes a job.)
    job_bytes = cost.memory - cost.histograms * hist_bytes
    db = redis.Redis.from_url(stack.redis.url(PENDING_DB))
    findings.memory = {
        "pending_jobs": PENDING_JOBS,
        "used_memory_delta": cost.memory,
        "new_latency_histograms": cost.histograms,
        "latency_histogram_bytes": hist_bytes,
        "raw_bytes_per_pending_job": round(cost.memory / PENDING_JOBS, 1),
        "bytes_per_pending_job": round(job_bytes / PENDING_JOBS, 1),
        "memory_usage_by_key": memory_by_kind(db, PENDING_JOBS),
    }
    findings.keys_without_ttl["after enqueue"] = keys_without_ttl(db)
    before = meter.snapshot()
    await poll_jobs(url, job_ids[:GET_JOB_CALLS])
    findings.add(GET_JOB, meter.cost(before, meter.snapshot()), GET_JOB_CALLS)
    stack.stop_child(frontend)
    db.flushdb()
    db.close()


async def measure_scripts(meter: Meter, url: str, findings: Findings) -> None:
    """The take and transition scripts alone, as the worker calls them, on a scratch db."""
    client = AsyncRedis.from_url(url)
    store = JobStore(
        client, result_ttl_s=RESULT_TTL_S, job_deadline_s=JOB_DEADLINE_S, max_queue_depth=100_000
    )
    now = utcnow()
    # One run each: a second change to a run would be parked behind the first.
    records = [
        JobRecord.new(
            StateChange(run_type=RunType.TASK, run_id=str(uuid.uuid4()), state=StateType.RUNNING),
            enqueued_at=now,
            deadline_s=JOB_DEADLINE_S,
            client_id="local",
        )
        for _ in range(SCRIPT_CALLS)
    ]
    await store.enqueue_many(records)
    start = meter.snapshot()
    taken = 0
    while taken < len(records):
        taken += len((await store.take(1, lease_s=10)).taken)
    claimed = meter.snapshot()
    orchestration = Orchestration(status="ACCEPT", state_type="RUNNING", state_name="Running")
    for record in records:
        await store.transition(
            record.job_id,
            allowed=(Status.RUNNING,),
            status=Status.APPLIED,
            set_fields={"finished_at": utcnow(), "attempts": 1, "orchestration": orchestration},
            clear_fields=("next_attempt_at", "blocked_on", "error"),
        )
    done = meter.snapshot()
    findings.add(CLAIM, meter.cost(start, claimed), SCRIPT_CALLS)
    findings.add(TRANSITION, meter.cost(claimed, done), SCRIPT_CALLS)
    await client.flushdb()
    await client.aclose()


async def measure_apply(stack: BenchStack, meter: Meter, findings: Findings) -> float:
    """APPLY_JOBS single changes to real task runs, then one worker applies them.

    Returns when the last job was enqueued (the run keys' TTL counts from then).
    """
    settings = {"result_ttl_s": RESULT_TTL_S, "job_deadline_s": JOB_DEADLINE_S}
    prefect = PrefectRuns(stack.prefect.api_url)
    try:
        run_ids = [await prefect.task_run() for _ in range(APPLY_JOBS)]
    finally:
        await prefect.aclose()
    frontend, url = stack.frontend("frontend", **settings)
    before = meter.snapshot()
    await enqueue_singles(url, run_ids)
    enqueued_at = time.monotonic()
    after = meter.snapshot()
    findings.add(ENQUEUE_ONE, meter.cost(before, after), APPLY_JOBS)
    stack.stop_child(frontend)

    start = meter.snapshot()
    worker = start_worker(stack, "worker", **settings)
    terminal = await wait_terminal(meter, worker, start)
    findings.add(APPLY, meter.cost(start, terminal), APPLY_JOBS)
    findings.expiry["finished_record"] = finished_record(meter.client)
    findings.expiry["outcomes"] = {
        name: count
        for name, count in FleetCounts.from_hash(meter.client.hgetall(STATS_KEY)).totals.items()
        if count
    }
    idle = meter.snapshot()
    await asyncio.sleep(IDLE_WINDOW_S)  # a rate over a fixed window, not a wait for a state
    findings.add(IDLE, meter.cost(idle, meter.snapshot()), IDLE_WINDOW_S)
    findings.keys_without_ttl["after apply"] = keys_without_ttl(meter.client)
    stack.stop_child(worker)  # a clean stop deletes its heartbeat and arq's health-check key
    return enqueued_at


def finished_record(client: redis.Redis) -> dict[str, Any]:
    """Size and encoding of the most recently finished record (kept RESULT_TTL_S)."""
    name = next(client.scan_iter(match="pmq:job:*", count=1_000))
    return {
        "key": "pmq:job:* (applied)",
        "bytes per job": client.memory_usage(name, samples=0),
        "encoding": client.object("encoding", name).decode(),
        "longest value": _longest_value(client, name),
    }


async def wait_terminal(meter: Meter, worker: Service, start: Snapshot) -> Snapshot:
    """The snapshot at which every job is terminal.

    Each job here (one per run, so none is parked) publishes twice: when TAKE
    claims it and when its outcome is written; nothing else here publishes.
    (This waited for arq's DEL of its per-job keys, which workers no longer make.)
    """
    latest = start

    def done(command: str) -> int:
        return latest.commands.get(command, 0) - start.commands.get(command, 0)

    def all_terminal() -> bool:
        nonlocal latest
        if not worker.running:
            raise RuntimeError(f"worker exited; see {worker.log_path}")
        latest = meter.snapshot()
        return done("publish") >= 2 * APPLY_JOBS

    await wait_for(all_terminal, JOB_DEADLINE_S + 60, "all jobs terminal")
    return latest


async def measure_expiry(
    meter: Meter, baseline: Snapshot, hist_bytes: int, enqueued_at: float, findings: Findings
) -> None:
    """Wait until only the fleet counters are left; compare memory with the baseline."""
    client = meter.client
    # Records expire RESULT_TTL_S after they finish; run keys and anything still
    # pending, JOB_DEADLINE_S + RESULT_TTL_S after the enqueue.
    limit_s = JOB_DEADLINE_S + RESULT_TTL_S + 30 - (time.monotonic() - enqueued_at)
    started = time.monotonic()
    await wait_for(lambda: client.dbsize() <= len(FLEET_KEYS), max(limit_s, 30), "keys expired")
    waited_s = time.monotonic() - started
    settled = await sole_client_snapshot(meter)
    client.memory_purge()
    purged = meter.snapshot()
    remaining = remaining_keys(client)
    fleet_bytes = sum(k["bytes"] for k in remaining if k["key"] in FLEET_KEYS)
    new_histograms = settled.histograms - baseline.histograms
    own_delta = settled.own_memory - baseline.own_memory
    explained = new_histograms * hist_bytes + fleet_bytes + own_delta
    findings.keys_without_ttl["at the end"] = keys_without_ttl(client)
    findings.expiry |= {
        "waited_s": round(waited_s, 1),
        "remaining_keys": remaining,
        "fleet_keys_bytes": fleet_bytes,
        "new_latency_histograms": new_histograms,
        "latency_histogram_bytes": hist_bytes,
        "meter_connection_delta": own_delta,
        "rows": [
            _memory_row("baseline (before the first enqueue)", baseline),
            _memory_row("all jobs expired", settled),
            _memory_row("after MEMORY PURGE", purged),
        ],
        "tolerance": explained + REDIS_SLACK,
        "slowlog_entries": client.slowlog_len(),
        # What is left once the explained growth is taken out; about 0 if nothing leaks.
        "unexplained_bytes": settled.num("used_memory") - baseline.num("used_memory") - explained,
    }


def _memory_row(label: str, snap: Snapshot) -> dict[str, Any]:
    keys = sum(
        int(v.split(",")[0].split("=")[1])
        for k, v in snap.fields.items()
        if k.startswith("db") and k[2:].isdigit()
    )
    return {
        "when": label,
        "keys": keys,
        "clients": snap.num("connected_clients"),
        "used_memory": snap.num("used_memory"),
        "used_memory_rss": snap.num("used_memory_rss"),
    }


# --- report --------------------------------------------------------------------------------


def print_findings(findings: Findings) -> None:
    print("\nRedis cost per job (per call for get_job, per second for the idle worker):")
    rows = [{"phase": phase, **findings.costs[phase]} for phase in PHASES]
    table(rows, ["phase", "count", "commands", "bytes in", "bytes out"])
    print("\ncommands per job, by command:")
    names = sorted({n for per in findings.commands.values() for n in per})
    table(
        [
            {"command": n, **{col: findings.commands[p].get(n) for p, col in PHASES.items()}}
            for n in names
        ],
        ["command", *PHASES.values()],
    )
    memory = findings.memory
    print(
        f"\nmemory per pending job: {memory['bytes_per_pending_job']:.0f} bytes "
        f"(used_memory +{memory['used_memory_delta']:,} for {memory['pending_jobs']:,} jobs, "
        f"less {memory['new_latency_histograms']} new latency histograms x "
        f"{memory['latency_histogram_bytes']:,} B); MEMORY USAGE by key:"
    )
    columns = ["key", "bytes per job", "encoding", "longest value"]
    table(memory["memory_usage_by_key"], columns)
    print("a finished record, after apply:")
    table([findings.expiry["finished_record"]], columns)
    print(f"\nexpiry (waited {findings.expiry['waited_s']} s for the keys to go):")
    table(findings.expiry["rows"], ["when", "keys", "clients", "used_memory", "used_memory_rss"])
    print("keys left:")
    table(findings.expiry["remaining_keys"], ["key", "ttl s", "bytes"])
    for where, names in findings.keys_without_ttl.items():
        print(f"keys without a TTL {where}: {len(names)} {names[:10]}")


def judge(report: Report, findings: Findings) -> None:
    expiry = findings.expiry
    baseline, settled = expiry["rows"][0], expiry["rows"][1]
    allowed = baseline["used_memory"] + expiry["tolerance"]
    report.goal(
        "used_memory returns to the baseline once every job expired",
        settled["used_memory"] <= allowed,
        f"{settled['used_memory']:,} B vs baseline {baseline['used_memory']:,} B + tolerance "
        f"{expiry['tolerance']:,} B ({expiry['new_latency_histograms']} latency histograms of "
        f"{expiry['latency_histogram_bytes']:,} B for first-seen commands, "
        f"{expiry['fleet_keys_bytes']:,} B of fleet counters, "
        f"{expiry['meter_connection_delta']:+,} B of the bench's own connection, "
        f"{REDIS_SLACK:,} B of slack for Redis' tables and slow log); "
        f"unexplained {expiry['unexplained_bytes']:+,} B",
    )
    left = [k["key"] for k in expiry["remaining_keys"]]
    report.goal(
        "keys return to the baseline's count, bar the fleet-wide counters",
        set(left) <= FLEET_KEYS and settled["keys"] - baseline["keys"] == len(left),
        f"{baseline['keys']} keys before, {settled['keys']} after: {', '.join(left) or 'none'}",
    )
    leaks = {where: names for where, names in findings.keys_without_ttl.items() if names}
    report.goal(
        "every key has a TTL (after enqueue, after apply, at the end)",
        not leaks,
        "none without" if not leaks else f"without a TTL: {leaks}",
    )
    outcomes = expiry["outcomes"]
    report.goal(
        f"all {APPLY_JOBS} jobs applied (so the apply cost is that of real applies)",
        outcomes.get("applied", 0) == APPLY_JOBS,
        f"outcomes {outcomes}",
    )


async def run(stack: BenchStack, report: Report) -> None:
    findings = Findings()
    meter = Meter(stack.redis.url())
    preload_scripts(meter.client)
    hist_bytes = histogram_bytes(meter)
    await measure_scripts(meter, stack.redis.url(SCRATCH_DB), findings)
    baseline = await sole_client_snapshot(meter)
    _progress(f"{PENDING_JOBS:,} pending jobs: enqueue, memory, get_job")
    await measure_pending(stack, meter, hist_bytes, findings)
    _progress(f"{APPLY_JOBS} task runs in Prefect, enqueued one by one, applied by a worker")
    enqueued_at = await measure_apply(stack, meter, findings)
    findings.derive_rest()
    _progress("waiting for every key to expire")
    await measure_expiry(meter, baseline, hist_bytes, enqueued_at, findings)
    print_findings(findings)
    report.sections |= {
        "settings": {
            "pending_jobs": PENDING_JOBS,
            "pending_batch": PENDING_BATCH,
            "apply_jobs": APPLY_JOBS,
            "result_ttl_s": RESULT_TTL_S,
            "job_deadline_s": JOB_DEADLINE_S,
        },
        "cost_per_job": findings.costs,
        "commands_per_job": findings.commands,
        "memory": findings.memory,
        "expiry": findings.expiry,
        "keys_without_ttl": findings.keys_without_ttl,
    }
    judge(report, findings)


def _progress(what: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {what} ...", flush=True)


def main() -> None:
    report = Report("b4_redis_cost", ".venv/bin/python bench/b4_redis_cost.py")
    started = time.monotonic()
    with bench_stack() as stack:
        asyncio.run(run(stack, report))
    report.sections["runtime_s"] = round(time.monotonic() - started, 1)
    report.save()


if __name__ == "__main__":
    main()
