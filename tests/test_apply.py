"""Changes applied to a real Prefect server through the MCP tools, one shared worker."""

from typing import cast

import pytest
from mcp import Client

from mcp_frontend.server import build_server
from tests.conftest import Stack
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from worker.contract import StateType


@pytest.mark.parametrize("state", list(StateType))
async def test_every_state_type_applies_to_task_and_flow_runs(
    worked_stack: Stack, prefect: PrefectRuns, state: StateType
) -> None:
    flow_run = await prefect.flow_run("RUNNING")
    task_run = await prefect.task_run(flow_run, state="RUNNING")
    other_flow = await prefect.flow_run("RUNNING")
    async with Client(build_server(worked_stack.settings)) as client:
        task_ticket = await ok(
            client,
            "set_task_run_state",
            task_run_id=task_run,
            state=state.lower(),
            message=f"to {state}",
            force=True,
        )
        flow_ticket = await ok(
            client,
            "set_flow_run_state",
            flow_run_id=other_flow,
            state=state.value.title(),
            message=f"to {state}",
            force=True,
        )
        assert task_ticket["status"] == "queued" and task_ticket["state"] == state
        task_job = await wait_terminal(client, task_ticket["job_id"])
        flow_job = await wait_terminal(client, flow_ticket["job_id"])
    for job, run_type, run_id in ((task_job, "task", task_run), (flow_job, "flow", other_flow)):
        assert job["status"] == "applied", job
        assert job["orchestration"]["status"] == "ACCEPT"
        assert job["attempts"] == 1
        current = await prefect.state(run_type, run_id)
        assert current["type"] == state
        assert current["message"] == f"to {state}"


async def test_task_to_running_under_pending_flow_is_rejected(
    worked_stack: Stack, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("PENDING")
    task_run = await prefect.task_run(flow_run, state="PENDING")
    async with Client(build_server(worked_stack.settings)) as client:
        ticket = await ok(client, "set_task_run_state", task_run_id=task_run, state="RUNNING")
        job = await wait_terminal(client, ticket["job_id"])
    assert job["status"] == "rejected"
    assert job["orchestration"]["status"] == "ABORT"
    assert job["orchestration"]["reason"]
    assert job["error"] is None
    assert (await prefect.state("task", task_run))["type"] == "PENDING"


async def test_flow_pending_to_pending_is_rejected_with_kept_state(
    worked_stack: Stack, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("PENDING")
    async with Client(build_server(worked_stack.settings)) as client:
        ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="PENDING")
        job = await wait_terminal(client, ticket["job_id"])
    assert job["status"] == "rejected"
    assert job["orchestration"]["status"] == "ABORT"
    assert job["orchestration"]["state_type"] == "PENDING"


async def test_future_scheduled_run_waits_then_applies(
    worked_stack: Stack, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("SCHEDULED", scheduled_in_s=3)
    async with Client(build_server(worked_stack.settings)) as client:
        ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
        waiting = await ok(client, "get_job", job_id=ticket["job_id"], wait_s=1.5)
        assert waiting["status"] == "waiting", waiting
        assert waiting["next_attempt_at"] is not None
        assert waiting["orchestration"]["status"] == "WAIT"
        job = await wait_terminal(client, ticket["job_id"])
    assert job["status"] == "applied", job
    assert job["attempts"] >= 2
    assert job["started_at"] < job["finished_at"]
    assert job["finished_at"] >= waiting["next_attempt_at"]
    assert (await prefect.state("flow", flow_run))["type"] == "RUNNING"


@pytest.mark.parametrize("tool", ["set_task_run_state", "set_flow_run_state"])
async def test_unknown_run_fails_with_run_not_found(worked_stack: Stack, tool: str) -> None:
    field = "task_run_id" if "task" in tool else "flow_run_id"
    unknown = "00000000-0000-4000-8000-000000000000"
    async with Client(build_server(worked_stack.settings)) as client:
        ticket = await ok(client, tool, **{field: unknown, "state": "COMPLETED"})
        job = await wait_terminal(client, ticket["job_id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "run_not_found"
    assert job["attempts"] == 1
    ttl_s = cast(int, worked_stack.redis.ttl(f"pmq:job:{ticket['job_id']}"))
    assert worked_stack.settings.result_ttl_s - 60 < ttl_s <= worked_stack.settings.result_ttl_s
