"""The changes the benchmarks apply, and the direct-to-Prefect baseline that applies them.

Every run gets `steps` forced changes (forced, so Prefect accepts each one
and the same runs can serve several rounds); runs are interleaved at random
and each run's own changes keep their order, as a fleet of agents would send
them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import State, StateType

from bench.harness import percentile

STATES = ["RUNNING", "COMPLETED", "FAILED", "PENDING", "SCHEDULED", "PAUSED"]


def plan(runs: list[str], steps: int, seed: int) -> list[dict[str, Any]]:
    """`steps` changes per task run, interleaved across runs, per-run order kept."""
    rng = random.Random(seed)
    queues = {
        run: [
            {
                "run_type": "task",
                "run_id": run,
                "state": rng.choice(STATES),
                "message": f"{seed}:{step}",
                "force": True,
            }
            for step in range(steps)
        ]
        for run in runs
    }
    order = [run for run, changes in queues.items() for _ in changes]
    rng.shuffle(order)
    return [queues[run].pop(0) for run in order]


async def create_task_runs(api_url: str, count: int) -> list[str]:
    """`count` task runs in PENDING, one at a time (SQLite answers 503 to concurrent creates)."""
    flow = {"name": "pmq-bench"}
    # Connection refusals are tried again (by httpx); see the create's own retry below.
    retrying = httpx.AsyncHTTPTransport(retries=2)
    async with httpx.AsyncClient(base_url=api_url, timeout=60, transport=retrying) as http:
        flow_id = (await http.post("/flows/", json=flow)).json()["id"]
        flow_run = await http.post(
            "/flow_runs/", json={"flow_id": flow_id, "state": {"type": "RUNNING"}}
        )
        flow_run_id = flow_run.json()["id"]
        runs: list[str] = []

        async def create(index: int) -> None:
            body = {
                "flow_run_id": flow_run_id,
                "task_key": "bench",
                "dynamic_key": str(index),
                "name": f"bench-{index}",
                "state": {"type": "PENDING"},
            }
            # A create is idempotent (Prefect returns the run of the same keys), so a
            # dropped connection is tried again: a 2-process Prefect has closed one
            # mid-setup (httpx.ReadError) in 2 of ~10 bench starts on 2026-12-04.
            for attempt in range(3):
                try:
                    response = await http.post("/task_runs/", json=body)
                    break
                except (httpx.ReadError, httpx.RemoteProtocolError):
                    if attempt == 2:
                        raise
            response.raise_for_status()
            runs.append(response.json()["id"])

        for index in range(count):
            await create(index)
    return runs


@dataclass
class DirectResult:
    concurrency: int
    changes: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)  # seconds since start, per change

    @property
    def per_s(self) -> float:
        return self.changes / self.seconds

    def row(self) -> dict[str, Any]:
        return {
            "mode": f"direct c={self.concurrency}",
            "changes": self.changes,
            "seconds": round(self.seconds, 2),
            "applied_per_s": round(self.per_s, 1),
            "prefect_p50_ms": round(percentile(self.latencies_s, 50) * 1000, 1),
            "prefect_p99_ms": round(percentile(self.latencies_s, 99) * 1000, 1),
        }


async def direct_drain(
    api_url: str, changes: list[dict[str, Any]], concurrency: int
) -> DirectResult:
    """Apply `changes` with Prefect's own client, `concurrency` calls in flight.

    Each run's changes go one after another (order per run, as the queue keeps
    it); up to `concurrency` runs are served at once. This is what a caller
    without a queue does: call set_task_run_state and wait for the answer.
    """
    per_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for change in changes:
        per_run[change["run_id"]].append(change)
    todo = list(per_run.values())
    result = DirectResult(concurrency, len(changes), 0.0)
    started = time.perf_counter()
    async with PrefectClient(api_url, httpx_settings={"timeout": 60}) as client:

        async def lane() -> None:
            while todo:
                for change in todo.pop():
                    state = State(type=StateType(change["state"]), message=change["message"])
                    before = time.perf_counter()
                    answer = await client.set_task_run_state(
                        UUID(change["run_id"]), state, force=True
                    )
                    now = time.perf_counter()
                    assert answer.status.value == "ACCEPT", answer
                    result.latencies_s.append(now - before)
                    result.done_at.append(now - started)

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result
