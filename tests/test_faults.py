"""Transient failures for real: a stopped Prefect server and a proxy injecting 429/503."""

import time
from datetime import datetime

from mcp import Client

from mcp_frontend.devstack import PrefectServer
from mcp_frontend.server import build_server
from tests.chaos_proxy import ChaosProxy, Fault
from tests.conftest import Stack
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns


async def _until_seen_waiting(
    client: Client, job_ids: list[str], count: int, timeout_s: float
) -> set[str]:
    """Poll until `count` jobs have been seen `waiting` on a transient error; none may end.

    Not every job: while Prefect fails, a worker's adaptive limit drops to one call
    in flight, so the others stay `queued` (untried) rather than burn attempts.
    """
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < count:
        jobs = (await ok(client, "get_jobs", job_ids=job_ids))["jobs"]
        assert not [j for j in jobs if j["status"] not in ("queued", "running", "waiting")]
        seen |= {
            j["job_id"]
            for j in jobs
            if j["status"] == "waiting"
            and j["error"]["code"] == "transient_error"
            and j["next_attempt_at"]
        }
        assert time.monotonic() < deadline, f"{len(seen)} seen waiting in {timeout_s} s: {jobs}"
        # Doubles as a 0.1 s pause: these jobs cannot finish while Prefect is down.
        await ok(client, "get_job", job_id=job_ids[0], wait_s=0.1)
    return seen


async def test_jobs_wait_while_prefect_is_down_and_apply_after_restart(
    stack: Stack, own_prefect: PrefectServer
) -> None:
    runs = PrefectRuns(own_prefect.api_url)
    try:
        flow_run = await runs.flow_run("RUNNING")
        task_runs = [await runs.task_run(flow_run) for _ in range(10)]
        stack.start_worker(prefect_api_url=own_prefect.api_url, max_attempts=100)
        own_prefect.stop()
        async with Client(build_server(stack.settings)) as client:
            tickets = [
                await ok(client, "set_task_run_state", task_run_id=run, state="RUNNING")
                for run in task_runs
            ]
            job_ids = [t["job_id"] for t in tickets]
            waited = await _until_seen_waiting(client, job_ids, count=3, timeout_s=30)
            own_prefect.start_and_wait()
            done = [await wait_terminal(client, job_id, timeout_s=60) for job_id in job_ids]
        assert [j["status"] for j in done] == ["applied"] * 10
        assert all(j["error"] is None for j in done)
        assert all(j["attempts"] >= 2 for j in done if j["job_id"] in waited)
        for run in task_runs:
            assert [s["type"] for s in await runs.history("task", run)] == ["PENDING", "RUNNING"]
    finally:
        await runs.aclose()


async def test_429_and_503_delay_the_job_then_it_applies(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("PENDING")
    proxy.script.extend([Fault(429, retry_after_s=1)] * 3 + [Fault(503)] * 2)
    stack.start_worker(prefect_api_url=proxy.url + "/api", max_attempts=10)
    async with Client(build_server(stack.settings)) as client:
        ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
        seen_waiting = await ok(client, "get_job", job_id=ticket["job_id"], wait_s=0.5)
        job = await wait_terminal(client, ticket["job_id"])
    assert seen_waiting["status"] == "waiting"
    assert "429" in seen_waiting["error"]["message"]
    assert job["status"] == "applied", job
    assert job["attempts"] == 6 and proxy.faults_sent == 5
    waited_s = (
        datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["enqueued_at"])
    ).total_seconds()
    assert waited_s >= 3.0  # three Retry-After: 1 floors
    assert [s["type"] for s in await prefect.history("flow", flow_run)] == ["PENDING", "RUNNING"]


async def test_attempt_limit_ends_in_retries_exhausted(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("PENDING")
    proxy.always = Fault(503)
    stack.start_worker(prefect_api_url=proxy.url + "/api", max_attempts=3)
    async with Client(build_server(stack.settings)) as client:
        ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
        job = await wait_terminal(client, ticket["job_id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "retries_exhausted"
    assert "503" in job["error"]["message"]
    assert job["attempts"] == 3 and proxy.faults_sent == 3
    assert (await prefect.state("flow", flow_run))["type"] == "PENDING"


async def test_job_deadline_ends_retries(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("PENDING")
    proxy.always = Fault(503)
    # The deadline is fixed when the frontend accepts the change.
    settings = stack.settings.model_copy(update={"job_deadline_s": 3.0})
    stack.start_worker(prefect_api_url=proxy.url + "/api", max_attempts=1000)
    async with Client(build_server(settings)) as client:
        ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
        job = await wait_terminal(client, ticket["job_id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "retries_exhausted"
    assert "deadline" in job["error"]["message"]
    finished = datetime.fromisoformat(job["finished_at"])
    assert (finished - datetime.fromisoformat(job["enqueued_at"])).total_seconds() <= 3.5
    assert 2 <= job["attempts"] < 1000
