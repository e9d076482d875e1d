"""Prefect's named states and their details, through every path, against a real Prefect.

Each operation an agent can ask for (retry later, reschedule, mark late, pause
until, suspend, cancel properly) ends `applied`, and Prefect shows the name and
the details; Prefect's refusals end `rejected` with its reason; bad input is a
tool error naming the field and the rule, and writes nothing.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from mcp import Client

from mcp_frontend.server import build_server
from tests.conftest import Stack
from tests.mcp_calls import error, ok, wait_terminal
from tests.prefect_runs import PrefectRuns

RUN_ID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
SOON = (datetime.now(UTC) + timedelta(days=1)).isoformat()
PAST = "2020-01-01T00:00:00Z"


def _flow(**args: Any) -> tuple[str, dict[str, Any]]:
    return "set_flow_run_state", {"flow_run_id": RUN_ID, **args}


def _batch(**item: Any) -> tuple[str, dict[str, Any]]:
    return "submit_state_changes", {
        "changes": [
            {"run_type": "flow", "run_id": RUN_ID, "state": "RUNNING"},
            {"run_type": "task", "run_id": RUN_ID, **item},
        ]
    }


# (call, text the error must contain: the field and the rule)
BAD: list[tuple[tuple[str, dict[str, Any]], str]] = [
    (
        _flow(state="RUNNING", scheduled_time="10m"),
        "invalid scheduled_time: applies only to state SCHEDULED, not RUNNING",
    ),
    (
        _flow(state="SCHEDULED", scheduled_time="tomorrow"),
        "invalid scheduled_time: must be an ISO 8601 time with a zone, or like 90s",
    ),
    (
        _flow(state="SCHEDULED", scheduled_time="2026-12-24T09:00:00"),
        "invalid scheduled_time: must carry a zone",
    ),
    (
        _flow(state="SCHEDULED", scheduled_time="10w"),
        "invalid scheduled_time: must be an ISO 8601 time",
    ),
    (
        _flow(state="SCHEDULED", scheduled_time="99999d"),
        "invalid scheduled_time: must be within 10 years",
    ),
    (
        _flow(state="RUNNING", name="AwaitingRetry"),
        "invalid name: 'AwaitingRetry' is a SCHEDULED state in Prefect, not RUNNING",
    ),
    (
        _flow(state="SCHEDULED", name="suspended"),
        "invalid name: 'Suspended' is a PAUSED state in Prefect, not SCHEDULED",
    ),
    (_flow(state="PAUSED", name="Cancelling"), "invalid name: 'Cancelling' is a CANCELLING state"),
    (_flow(state="RUNNING", name="x" * 65), "invalid name: must be at most 64 characters, got 65"),
    (_flow(state="RUNNING", name="   "), "invalid name: must not be empty or blank"),
    (_flow(state="RUNNING", name="bad\nname"), "invalid name: must not contain control characters"),
    (
        _flow(state="RUNNING", pause_timeout=60),
        "invalid pause_timeout: applies only to state PAUSED, not RUNNING",
    ),
    (_flow(state="PAUSED", pause_timeout=0), "invalid pause_timeout: must be more than 0 seconds"),
    (_flow(state="PAUSED", pause_timeout=-5), "invalid pause_timeout: must be more than 0 seconds"),
    (
        _flow(state="PAUSED", pause_timeout=60, pause_expiration_time=SOON),
        "invalid pause_timeout: give pause_timeout or pause_expiration_time, not both",
    ),
    (
        _flow(state="PAUSED", pause_expiration_time=PAST),
        "invalid pause_expiration_time: must be in the future: Prefect fails a run whose pause",
    ),
    (
        _flow(state="SCHEDULED", pause_expiration_time=SOON),
        "invalid pause_expiration_time: applies only to state PAUSED, not SCHEDULED",
    ),
    (
        _flow(state="RUNNING", pause_reschedule=True),
        "invalid pause_reschedule: applies only to state PAUSED, not RUNNING",
    ),
    (
        _flow(state="PAUSED", name="Suspended", pause_reschedule=False),
        "invalid pause_reschedule: a Suspended run is always rescheduled",
    ),
    (_flow(state="PAUSED", pause_key=""), "invalid pause_key: must be 1-64 characters"),
    (_flow(state="PAUSED", pause_key="k" * 65), "invalid pause_key: must be 1-64 characters"),
    (
        _flow(state="COMPLETED", pause_key="k"),
        "invalid pause_key: applies only to state PAUSED, not COMPLETED",
    ),
    (_flow(state="RUNNING", nmae="Retrying"), "unknown argument 'nmae'; nothing was queued"),
    (
        _flow(state="RUNNING", Name="x", sheduled_time="1m"),
        "sheduled_time\n  unknown argument 'sheduled_time'; nothing was queued",
    ),
    (
        _batch(state="RUNNING", scheduled_time="10m"),
        "invalid changes[1].scheduled_time: applies only to state SCHEDULED",
    ),
    (
        _batch(state="SCHEDULED", name="Retrying"),
        "invalid changes[1].name: 'Retrying' is a RUNNING state",
    ),
    (_batch(state="RUNNING", nmae="Retrying"), "unknown argument 'nmae'; nothing was queued"),
    (("get_job", {"job_id": "0" * 32, "wait": 5}), "unknown argument 'wait'; nothing was done"),
]


@pytest.mark.parametrize(("call", "expected"), BAD, ids=[text[:60] for _, text in BAD])
async def test_bad_details_are_a_clear_error_and_write_nothing(
    stack: Stack, call: tuple[str, dict[str, Any]], expected: str
) -> None:
    tool, args = call
    async with Client(build_server(stack.settings)) as client:
        message = await error(client, tool, **args)
    assert expected in message
    if "nothing was" not in expected:
        assert "nothing was queued" in message
    assert stack.redis.dbsize() == 0


async def test_every_tool_schema_refuses_unknown_arguments(stack: Stack) -> None:
    async with Client(build_server(stack.settings)) as client:
        tools = (await client.list_tools()).tools
    assert {tool.name for tool in tools} >= {"set_flow_run_state", "submit_state_changes"}
    for tool in tools:
        assert tool.input_schema["additionalProperties"] is False, tool.name
    batch = next(tool for tool in tools if tool.name == "submit_state_changes")
    item = batch.input_schema["$defs"]["ChangeIn"]
    assert item["additionalProperties"] is False
    assert {
        "name",
        "scheduled_time",
        "pause_timeout",
        "pause_expiration_time",
        "pause_reschedule",
        "pause_key",
    } <= set(item["properties"])


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


async def _apply(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    ticket = await ok(client, tool, **args)
    return await wait_terminal(client, ticket["job_id"])


async def test_retry_later_is_scheduled_at_that_time_for_flow_and_task_runs(
    worked_stack: Stack, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.deployment_flow_run("RUNNING")
    task_run = await prefect.task_run(flow_run, state="RUNNING")
    async with Client(build_server(worked_stack.settings)) as client:
        asked_at = datetime.now(UTC)
        flow_job = await _apply(
            client,
            "set_flow_run_state",
            flow_run_id=flow_run,
            state="SCHEDULED",
            name="awaitingretry",
            scheduled_time="2s",
        )
        task_job = await _apply(
            client,
            "set_task_run_state",
            task_run_id=task_run,
            state="SCHEDULED",
            name="AwaitingRetry",
            scheduled_time="2s",
        )
    for job, run_type, run_id in ((flow_job, "flow", flow_run), (task_job, "task", task_run)):
        assert job["status"] == "applied", job
        assert job["state_name"] == "AwaitingRetry"  # Prefect's spelling
        due = _at(job["scheduled_time"])
        assert timedelta(seconds=2) <= due - asked_at < timedelta(seconds=5)
        current = await prefect.state(run_type, run_id)
        assert (current["type"], current["name"]) == ("SCHEDULED", "AwaitingRetry")
        assert _at(current["state_details"]["scheduled_time"]) == due
        orchestration = job["orchestration"]
        assert orchestration["state_name"] == "AwaitingRetry"
        assert _at(orchestration["scheduled_time"]) == due


async def test_reschedule_mark_late_pause_suspend_and_cancel_properly_apply(
    worked_stack: Stack, prefect: PrefectRuns
) -> None:
    tomorrow_9 = (datetime.now(UTC) + timedelta(days=1)).replace(
        hour=9, minute=0, second=0, microsecond=0
    )
    async with Client(build_server(worked_stack.settings)) as client:
        rescheduled = await prefect.deployment_flow_run("RUNNING")
        job = await _apply(
            client,
            "set_flow_run_state",
            flow_run_id=rescheduled,
            state="SCHEDULED",
            scheduled_time=tomorrow_9.isoformat().replace("+00:00", "+01:00"),
        )
        assert job["status"] == "applied", job
        current = await prefect.state("flow", rescheduled)
        assert current["name"] == "Scheduled"
        assert _at(current["state_details"]["scheduled_time"]) == tomorrow_9 - timedelta(hours=1)

        late = await prefect.deployment_flow_run("SCHEDULED")  # as Prefect's scheduler marks
        job = await _apply(
            client,
            "set_flow_run_state",
            flow_run_id=late,
            state="SCHEDULED",
            name="Late",
            scheduled_time="2020-01-01T00:00:00Z",
        )
        assert job["status"] == "applied", job
        assert (await prefect.state("flow", late))["name"] == "Late"

        paused = await prefect.deployment_flow_run("RUNNING")
        job = await _apply(
            client,
            "set_flow_run_state",
            flow_run_id=paused,
            state="PAUSED",
            pause_expiration_time="10m",
            pause_key="approval-1",
        )
        assert job["status"] == "applied", job
        details = (await prefect.state("flow", paused))["state_details"]
        assert _at(details["pause_timeout"]) == _at(job["pause_expiration_time"])
        assert details["pause_key"] == "approval-1" and details["pause_reschedule"] is False

        suspended = await prefect.deployment_flow_run("RUNNING")
        job = await _apply(
            client,
            "set_flow_run_state",
            flow_run_id=suspended,
            state="PAUSED",
            name="Suspended",
            pause_timeout=3600,
        )
        assert job["status"] == "applied", job
        current = await prefect.state("flow", suspended)
        assert current["name"] == "Suspended"
        assert current["state_details"]["pause_reschedule"] is True

        cancelling = await prefect.deployment_flow_run("RUNNING")
        job = await _apply(
            client,
            "set_flow_run_state",
            flow_run_id=cancelling,
            state="CANCELLING",
            name="Cancelling",
        )
        assert job["status"] == "applied", job
        assert (await prefect.state("flow", cancelling))["type"] == "CANCELLING"

        flow_run = await prefect.flow_run("RUNNING")
        task_run = await prefect.task_run(flow_run, state="RUNNING")
        job = await _apply(
            client,
            "set_task_run_state",
            task_run_id=task_run,
            state="PAUSED",
            name="WaitingForApproval",
            pause_timeout=600,
        )
        assert job["status"] == "applied", job
        current = await prefect.state("task", task_run)
        assert (current["type"], current["name"]) == ("PAUSED", "WaitingForApproval")


async def test_prefects_refusals_of_these_end_rejected_with_its_reason(
    worked_stack: Stack, prefect: PrefectRuns
) -> None:
    async with Client(build_server(worked_stack.settings)) as client:
        # Prefect reschedules a finished flow run only through its deployment.
        no_deployment = await prefect.flow_run("FAILED")
        job = await _apply(
            client,
            "set_flow_run_state",
            flow_run_id=no_deployment,
            state="SCHEDULED",
            name="AwaitingRetry",
            scheduled_time="1m",
        )
        assert job["status"] == "rejected", job
        assert "without an associated deployment" in job["orchestration"]["reason"]

        not_running = await prefect.deployment_flow_run("PENDING")
        job = await _apply(
            client, "set_flow_run_state", flow_run_id=not_running, state="PAUSED", pause_timeout=600
        )
        assert job["status"] == "rejected", job
        assert "not currently running" in job["orchestration"]["reason"]

        not_deployed = await prefect.flow_run("RUNNING")
        job = await _apply(
            client, "set_flow_run_state", flow_run_id=not_deployed, state="PAUSED", name="Suspended"
        )
        assert job["status"] == "rejected", job
        assert "without a deployment" in job["orchestration"]["reason"]


async def test_a_resend_of_a_relative_time_is_the_same_change(stack: Stack) -> None:
    async with Client(build_server(stack.settings)) as client:
        args = {
            "flow_run_id": RUN_ID,
            "state": "SCHEDULED",
            "name": "AwaitingRetry",
            "scheduled_time": "10m",
            "idempotency_key": "retry-1",
        }
        first = await ok(client, "set_flow_run_state", **args)
        again = await ok(client, "set_flow_run_state", **args)
        other = await error(client, "set_flow_run_state", **{**args, "scheduled_time": "11m"})
    assert again["job_id"] == first["job_id"] and again["deduplicated"]
    assert "invalid idempotency_key" in other
