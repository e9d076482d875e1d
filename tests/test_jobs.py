"""Job lifecycle through the tools: cancel, idempotency keys, batch reads."""

from mcp import Client

from mcp_frontend.server import build_server
from tests.conftest import Stack
from tests.mcp_calls import error, ok, wait_terminal
from tests.prefect_runs import PrefectRuns


async def test_cancelled_job_is_never_applied_and_later_changes_proceed(
    stack: Stack, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("RUNNING")
    task_run = await prefect.task_run(flow_run, state="PENDING")
    async with Client(build_server(stack.settings)) as client:
        # No worker yet, so the first change is still queued when it is cancelled.
        first = await ok(client, "set_task_run_state", task_run_id=task_run, state="RUNNING")
        cancelled = await ok(client, "cancel_job", job_id=first["job_id"])
        assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
        again = await ok(client, "cancel_job", job_id=first["job_id"])
        assert again["status"] == "cancelled"
        second = await ok(client, "set_task_run_state", task_run_id=task_run, state="FAILED")
        stack.start_worker()
        applied = await wait_terminal(client, second["job_id"])
        assert applied["status"] == "applied"
        message = await error(client, "cancel_job", job_id=second["job_id"])
        assert "cannot be cancelled" in message and "applied" in message
        assert (await ok(client, "get_job", job_id=first["job_id"]))["status"] == "cancelled"
    history = [s["type"] for s in await prefect.history("task", task_run)]
    assert history == ["PENDING", "FAILED"]


async def test_idempotency_key_returns_the_same_job_and_applies_once(
    stack: Stack, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("PENDING")
    args = {"flow_run_id": flow_run, "state": "RUNNING", "idempotency_key": "agent-7:step-3"}
    async with Client(build_server(stack.settings)) as client:
        first = await ok(client, "set_flow_run_state", **args)
        repeat = await ok(client, "set_flow_run_state", **args)
        assert repeat["job_id"] == first["job_id"]
        assert (first["deduplicated"], repeat["deduplicated"]) == (False, True)
        conflict = await error(client, "set_flow_run_state", **{**args, "state": "FAILED"})
        assert "idempotency_key" in conflict and first["job_id"] in conflict
        stack.start_worker()
        job = await wait_terminal(client, first["job_id"])
    assert job["status"] == "applied"
    history = [s["type"] for s in await prefect.history("flow", flow_run)]
    assert history == ["PENDING", "RUNNING"]


async def test_get_jobs_answers_in_the_order_asked(stack: Stack) -> None:
    run_id = "6f1c1c9e-31a5-4c2f-9b7e-2d8f8d2f1a10"
    async with Client(build_server(stack.settings)) as client:
        tickets = [
            await ok(client, "set_task_run_state", task_run_id=run_id, state=state)
            for state in ("PENDING", "RUNNING", "COMPLETED")
        ]
        ids = [t["job_id"] for t in reversed(tickets)]
        jobs = (await ok(client, "get_jobs", job_ids=ids))["jobs"]
    assert [j["job_id"] for j in jobs] == ids
    assert [j["state"] for j in jobs] == ["COMPLETED", "RUNNING", "PENDING"]
    assert {j["status"] for j in jobs} == {"queued"}


async def test_get_job_without_wait_answers_at_once_with_the_current_status(stack: Stack) -> None:
    run_id = "6f1c1c9e-31a5-4c2f-9b7e-2d8f8d2f1a11"
    async with Client(build_server(stack.settings)) as client:
        ticket = await ok(client, "set_task_run_state", task_run_id=run_id, state="PENDING")
        job = await ok(client, "get_job", job_id=ticket["job_id"], wait_s=0.2)
    assert job["status"] == "queued"
    assert job["attempts"] == 0 and job["started_at"] is None
