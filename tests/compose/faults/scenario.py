"""What every fault scenario does: plan, submit through agents, drain, check, report.

A scenario submits RUNS x STEPS keyed changes over fresh task and flow runs from
AGENTS concurrent MCP clients, paced over SUBMIT_SPAN_S so that the fault lands
mid-drain while changes still arrive, then checks what the fleet tests check:
(a) every ticket a client got back names a job that ends `applied`;
(b) every change is in its run's Prefect history exactly once;
(c) each run's changes are there in the order they were submitted.
"""

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mcp import Client

from tests.compose.faults.agents import Agent, run_agents
from tests.compose.faults.topology import Frontend, Topology
from tests.compose.stack import Container, StackError, create_runs
from tests.compose.steps import report
from tests.fleet import assert_histories_match, plan_changes, wait_all_terminal
from tests.prefect_runs import PrefectRuns
from tests.test_auth import as_client
from worker.contract import TERMINAL_STATUSES

RUNS, STEPS, AGENTS = 200, 5, 4  # 1,000 changes, 250 per agent
SUBMIT_SPAN_S = 40.0  # how long the agents keep submitting
CALLS_PER_AGENT = 36  # expected: half single calls, half batches of 2-25 (13.5 on average)
MID_DRAIN_APPLIED = 100  # the fault starts once this many changes are applied
DRAIN_TIMEOUT_S = 240.0


@dataclass
class Scenario:
    """One scenario's changes, agents, and the times of what happened (epoch seconds)."""

    name: str
    topology: Topology
    prefect: PrefectRuns
    token: str
    changes: list[dict[str, Any]]
    agents: list[Agent]
    plans: list[list[dict[str, Any]]]
    marks: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def mark(self, event: str) -> float:
        self.marks[event] = now = time.time()
        report(f"{self.name}: {event} at +{now - self.started:.1f} s")
        return now

    @asynccontextmanager
    async def submitting(self) -> AsyncIterator[asyncio.Task[None]]:
        """The agents submit in the background for the block; their errors are raised after it."""
        task = asyncio.create_task(run_agents(self.agents, self.plans))
        self.mark("submit started")
        try:
            yield task
        except BaseException:
            task.cancel()
            raise
        await task
        self.mark("submit done")

    @contextmanager
    def recorded_in(self, results: dict[str, Any]) -> Iterator[None]:
        """Put the scenario's figures in the results, and why it failed if it did."""
        try:
            yield
        except BaseException as e:
            self.figures["failure"] = f"{type(e).__name__}: {e}"[:2000]
            raise
        finally:
            results["scenarios"][self.name] = figures = self.result()
            report(f"{self.name}: {figures}")

    def tickets(self) -> dict[str, str]:
        """Every change's job id by idempotency key, from every agent."""
        return {key: job for agent in self.agents for key, job in agent.tickets.items()}

    @asynccontextmanager
    async def checker(self) -> AsyncIterator[Client]:
        """A client on the last frontend (no scenario cuts that one off)."""
        async with as_client(self.topology.frontends()[-1].mcp_url, self.token) as client:
            yield client

    def result(self) -> dict[str, Any]:
        calls = [call for agent in self.agents for call in agent.calls]
        failed = [call for call in calls if not call.tickets]
        return {
            "changes": len(self.changes),
            "runs": RUNS,
            "agents": len(self.agents),
            "tool_calls": len(calls),
            "failed_calls": len(failed),
            # Resends whose change had been stored by the call that failed.
            "deduplicated_tickets": sum(agent.deduplicated for agent in self.agents),
            "failures_by_kind": dict(Counter(_kind(call.error) for call in failed)),
            "marks_s": {event: round(at - self.started, 1) for event, at in self.marks.items()},
            **self.figures,
        }


async def prepare(
    name: str, topology: Topology, prefect: PrefectRuns, token: str, seed: int
) -> Scenario:
    """Fresh runs, their keyed changes, and agents spread over the frontends."""
    runs = await create_runs(prefect, RUNS)
    changes = keyed(plan_changes(runs, STEPS, seed), seed)
    frontends = topology.frontends()
    owner = {run_id: index % AGENTS for index, (_, run_id) in enumerate(runs)}
    plans: list[list[dict[str, Any]]] = [[] for _ in range(AGENTS)]
    for change in changes:  # the plan's interleaving, per-run order kept
        plans[owner[change["run_id"]]].append(change)
    agents = [
        Agent(
            name=f"agent-{index}",
            token=token,
            urls=preferred_first(frontends, index % len(frontends)),
            seed=seed * 100 + index,
            pace_s=SUBMIT_SPAN_S / CALLS_PER_AGENT,
        )
        for index in range(AGENTS)
    ]
    return Scenario(name, topology, prefect, token, changes, agents, plans)


def preferred_first(frontends: list[Frontend], index: int) -> list[str]:
    return [f.mcp_url for f in frontends[index:] + frontends[:index]]


def keyed(changes: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """An idempotency key on every change: `<run>:<step>:<seed>`, unique to this scenario."""
    return [{**change, "idempotency_key": f"{change['message']}:{seed}"} for change in changes]


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll a blocking predicate (in a thread, so the agents keep running) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise StackError(f"{what}: not so after {timeout_s:g} s")
        await asyncio.sleep(0.2)
    return time.time()


async def mid_drain(scenario: Scenario, extra: Callable[[], bool] = lambda: True) -> None:
    """Wait until MID_DRAIN_APPLIED changes are applied (and `extra` holds)."""
    frontend = scenario.topology.frontends()[-1]
    start = await asyncio.to_thread(scenario.topology.applied_so_far, frontend)

    def ready() -> bool:
        applied = scenario.topology.applied_so_far(frontend) - start
        return applied >= MID_DRAIN_APPLIED and extra()

    await until(ready, 120, f"{MID_DRAIN_APPLIED} changes applied")


async def hold_fault(seconds: float) -> None:
    """The fault's duration: part of the scenario's definition, not a wait for a condition."""
    await asyncio.sleep(seconds)


async def check_all_applied(scenario: Scenario, fault_end: float) -> list[dict[str, Any]]:
    """Checks (a), (b) and (c), and the recovery figures; the jobs' final records."""
    tickets = scenario.tickets()
    keys = [change["idempotency_key"] for change in scenario.changes]
    unticketed = sorted(set(keys) - set(tickets))
    assert not unticketed, f"{len(unticketed)} changes without a ticket, e.g. {unticketed[:3]}"
    job_ids = [tickets[key] for key in keys]
    async with scenario.checker() as client:
        jobs = await wait_all_terminal(client, job_ids, DRAIN_TIMEOUT_S)
    drained = scenario.mark("drain done")
    wrong = [job for job in jobs if job["status"] != "applied"]
    assert not wrong, f"(a) {len(wrong)} of {len(jobs)} ticketed jobs not applied, e.g. {wrong[:3]}"
    await assert_histories_match(scenario.prefect, scenario.changes)  # (b) and (c)
    finished = [_epoch(job["finished_at"]) for job in jobs]
    last_applied = max(finished)
    scenario.figures |= {
        # What was left to do when the fault ended: the recovery is mostly working it off.
        "backlog_at_fault_end": sum(1 for at in finished if at > fault_end),
        "recovery_s": round(last_applied - fault_end, 1),
        "drain_seen_done_after_fault_s": round(drained - fault_end, 1),
        "jobs_with_retries": sum(1 for job in jobs if job["attempts"] > 1),
        "max_attempts": max(job["attempts"] for job in jobs),
    }
    return jobs


async def statuses_and_lost(
    client: Client, job_ids: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every job's record, and the ids the store no longer knows (a lost acknowledged change)."""
    lost: list[str] = []
    remaining = list(job_ids)
    while True:
        jobs: list[dict[str, Any]] = []
        unknown = None
        for start in range(0, len(remaining), 1000):
            result = await client.call_tool(
                "get_jobs", {"job_ids": remaining[start : start + 1000]}
            )
            text = " ".join(getattr(c, "text", "") for c in result.content)
            if result.is_error:
                # "unknown job_id <id>: no such job, or its record expired"
                words = (word.strip(":,.") for word in text.split())
                unknown = next((word for word in words if word in remaining), None)
                assert unknown, f"get_jobs failed: {text}"
                break
            assert result.structured_content is not None
            jobs.extend(result.structured_content["jobs"])
        if unknown is None:
            return jobs, lost
        lost.append(unknown)
        remaining.remove(unknown)


async def wait_existing_terminal(
    client: Client, job_ids: list[str], stall_s: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Like wait_all_terminal, for a store that may have lost jobs: until every job that
    still exists is terminal, or none has finished for `stall_s`; (jobs, lost ids)."""
    progress_at, unfinished = time.monotonic(), len(job_ids) + 1
    while True:
        jobs, lost = await statuses_and_lost(client, job_ids)
        pending = [job for job in jobs if job["status"] not in TERMINAL_STATUSES]
        if len(pending) < unfinished:
            progress_at, unfinished = time.monotonic(), len(pending)
        if not pending or time.monotonic() - progress_at > stall_s:
            return jobs, lost
        await client.call_tool("get_job", {"job_id": pending[0]["job_id"], "wait_s": 2.0})


def _kind(error: str) -> str:
    """A failure's kind, for the report: the start of its text, without ids or numbers."""
    if error.startswith("transport"):
        return error.split(":")[1].strip()
    for marker in ("may or may not be stored", "unavailable", "retry later"):
        if marker in error:
            return marker
    return error[:60]


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@asynccontextmanager
async def disconnected(
    topology: Topology, container: Container, network: str
) -> AsyncIterator[None]:
    """`docker network disconnect` for the block, reconnected afterwards whatever happened;
    the docker commands run in a thread so that the agents keep submitting meanwhile."""
    await asyncio.to_thread(topology.disconnect, container, network)
    try:
        yield
    finally:
        await asyncio.to_thread(topology.connect, container, network)
