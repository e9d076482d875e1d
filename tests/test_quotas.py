"""Per-client quotas, shared by every frontend through Redis; excess writes nothing."""

from typing import Any

from mcp import Client

from mcp_frontend.server import build_server
from tests.conftest import Services, make_stack
from tests.fleet import make_runs, wait_all_terminal
from tests.mcp_calls import error, ok
from tests.prefect_runs import PrefectRuns

RUN = "3f1d5c2a-6b7e-4c8d-9e0f-1a2b3c4d5e6f"


def change(state: str = "RUNNING") -> dict[str, Any]:
    return {"run_type": "task", "run_id": RUN, "state": state}


async def test_pending_quota_refuses_excess_and_frees_up_as_jobs_finish(
    services: Services, prefect: PrefectRuns
) -> None:
    stack = make_stack(services, client_max_pending=3)
    runs = await make_runs(prefect, 3, kinds=("flow",))
    try:
        async with (
            Client(build_server(stack.settings)) as first,
            Client(build_server(stack.settings)) as second,
        ):  # two frontends, one quota
            tickets = [
                await ok(first, "set_flow_run_state", flow_run_id=run, state="RUNNING")
                for _, run in runs[:2]
            ]
            keys = stack.redis.dbsize()
            batch = await error(
                second, "submit_state_changes", changes=[change(), change("FAILED")]
            )
            assert "quota" in batch and "has 2 pending changes, its limit is 3" in batch
            assert "PMQ_CLIENT_MAX_PENDING" in batch
            assert stack.redis.dbsize() == keys
            tickets.append(
                await ok(second, "set_flow_run_state", flow_run_id=runs[2][1], state="RUNNING")
            )
            single = await error(first, "set_task_run_state", task_run_id=RUN, state="RUNNING")
            assert "quota" in single and "retry" in single
            stack.start_worker()
            await wait_all_terminal(first, [t["job_id"] for t in tickets], timeout_s=60)
            assert (await ok(first, "set_task_run_state", task_run_id=RUN, state="RUNNING"))[
                "status"
            ] == "queued"
    finally:
        stack.stop()
    assert stack.keys_without_ttl() == []
    stack.flush()


async def test_rate_quota_says_when_to_retry_and_writes_nothing(services: Services) -> None:
    # One change per 100 s: nothing refills while the test runs, however slow the machine.
    stack = make_stack(services, client_max_rps=0.01, client_burst=3)
    try:
        async with (
            Client(build_server(stack.settings)) as first,
            Client(build_server(stack.settings)) as second,
        ):
            await ok(first, "submit_state_changes", changes=[change(), change("FAILED")])
            await ok(second, "set_task_run_state", task_run_id=RUN, state="COMPLETED")
            keys = stack.redis.dbsize()
            message = await error(second, "set_task_run_state", task_run_id=RUN, state="FAILED")
            assert "quota" in message and "0.01 changes/s" in message and "retry in" in message
            assert "PMQ_CLIENT_MAX_RPS" in message
            assert stack.redis.dbsize() == keys
            too_big = await error(first, "submit_state_changes", changes=[change()] * 4)
            assert "burst" in too_big
    finally:
        stack.stop()
    assert stack.keys_without_ttl() == []
    stack.flush()
