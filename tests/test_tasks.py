"""The MCP tasks extension end to end: `pmq serve` over streamable HTTP, real workers and Prefect.

Every message is checked against the extension's schema (tests/data, written
from the spec text of revision 2026-07-28).
"""

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.conftest import Stack
from tests.prefect_runs import PrefectRuns
from tests.tasks_client import Frontends, TasksClient
from tests.tasks_schema import assert_valid

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"


@pytest.fixture(scope="module")
def frontends(worked_stack: Stack) -> Frontends:
    return Frontends.start(worked_stack, f"{ALICE}:alice,{BOB}:bob")


@pytest.fixture
async def tasks(frontends: Frontends) -> AsyncIterator[TasksClient]:
    async with TasksClient(frontends.url) as client:
        yield client


async def _running_task_run(prefect: PrefectRuns) -> str:
    return await prefect.task_run(await prefect.flow_run("RUNNING"))


async def _until_waiting(client: TasksClient, task_id: str) -> dict[str, Any]:
    """Poll until the job behind the task is `waiting` (Prefect said WAIT)."""
    with anyio.fail_after(30):
        while True:
            task = (await client.get(task_id)).result
            if task["statusMessage"].startswith("waiting:"):
                return task
            await anyio.sleep(task["pollIntervalMs"] / 1000)


def _checked_create(exchange: Any) -> dict[str, Any]:
    assert_valid("JSONRPCResultResponse", exchange.response)
    assert_valid("CreateTaskResult", exchange.result)
    return dict(exchange.result)


def _checked_polls(polls: list[Any]) -> dict[str, Any]:
    for poll in polls:
        assert_valid("GetTaskRequest", poll.request)
        assert_valid("GetTaskResult", poll.result)
    return dict(polls[-1].result)


async def test_task_completes_with_get_jobs_result_inline(
    tasks: TasksClient, prefect: PrefectRuns
) -> None:
    task_run = await _running_task_run(prefect)
    created = _checked_create(
        await tasks.call_tool("set_task_run_state", {"task_run_id": task_run, "state": "COMPLETED"})
    )
    assert created["status"] == "working"
    assert 250 <= created["pollIntervalMs"] <= 5000

    final = _checked_polls(await tasks.poll(created["taskId"]))
    assert final["status"] == "completed", final
    assert final["statusMessage"].startswith("applied"), final
    assert_valid("CallToolResult", final["result"])
    assert final["result"]["isError"] is False
    # Exactly what the plain tool answers for the same job.
    plain = await tasks.call_tool("get_job", {"job_id": created["taskId"]}, tasks=False)
    assert {**plain.result, "isError": False} | {"_meta": None} == final["result"] | {"_meta": None}
    assert final["result"]["structuredContent"]["status"] == "applied"
    assert (await prefect.state("task", task_run))["type"] == "COMPLETED"


async def test_rejected_change_completes_with_a_tool_error(
    tasks: TasksClient, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("PENDING")
    task_run = await prefect.task_run(flow_run, state="PENDING")
    created = _checked_create(
        await tasks.call_tool("set_task_run_state", {"task_run_id": task_run, "state": "RUNNING"})
    )
    final = _checked_polls(await tasks.poll(created["taskId"]))
    # The spec keeps `failed` for JSON-RPC errors; a refusal is the tool's own answer.
    assert final["status"] == "completed", final
    assert final["result"]["isError"] is True
    assert final["result"]["structuredContent"]["status"] == "rejected"
    assert final["statusMessage"].startswith("rejected: Prefect answered ABORT"), final


async def test_batch_is_one_task_with_every_job_inline(
    tasks: TasksClient, prefect: PrefectRuns
) -> None:
    runs = [await _running_task_run(prefect) for _ in range(3)]
    changes = [{"run_type": "task", "run_id": run, "state": "COMPLETED"} for run in runs]
    created = _checked_create(await tasks.call_tool("submit_state_changes", {"changes": changes}))
    assert created["taskId"].startswith("batch-")
    final = _checked_polls(await tasks.poll(created["taskId"]))
    assert final["status"] == "completed", final
    assert final["statusMessage"] == "3 of 3 changes finished: 3 applied"
    jobs = final["result"]["structuredContent"]["jobs"]
    assert [job["run_id"] for job in jobs] == runs
    plain = await tasks.call_tool(
        "get_jobs", {"job_ids": [job["job_id"] for job in jobs]}, tasks=False
    )
    assert plain.result["structuredContent"] == final["result"]["structuredContent"]


async def test_unknown_and_malformed_task_ids_are_invalid_params(tasks: TasksClient) -> None:
    for task_id in ("0" * 32, "batch-" + "0" * 32, "not-an-id"):
        update = await tasks.request(
            "tasks/update", {"taskId": task_id, "inputResponses": {}}, tasks=True, name=task_id
        )
        for exchange in (await tasks.get(task_id), await tasks.cancel(task_id), update):
            assert_valid("TaskNotFoundError", exchange.response)
            assert "task not found" in exchange.error["message"]


async def test_plain_clients_get_the_plain_ticket(
    tasks: TasksClient, frontends: Frontends, prefect: PrefectRuns
) -> None:
    task_run = await _running_task_run(prefect)
    plain = await tasks.call_tool(
        "set_task_run_state", {"task_run_id": task_run, "state": "RUNNING"}, tasks=False
    )
    assert plain.result.get("resultType", "complete") == "complete"
    assert plain.result["structuredContent"]["status"] == "queued"
    # The SDK's own client never declares the extension: it sees tickets as before.
    async with Client(frontends.url) as client:
        result = await client.call_tool(
            "set_task_run_state", {"task_run_id": task_run, "state": "COMPLETED"}
        )
    assert not result.is_error
    assert result.structured_content is not None
    assert set(result.structured_content) >= {"job_id", "status", "enqueued_at"}


async def test_waiting_tasks_say_why_and_a_cancelled_batch_ends_cancelled(
    tasks: TasksClient, prefect: PrefectRuns
) -> None:
    # Runs scheduled a minute ahead: Prefect answers WAIT, so the changes stay pending.
    early = await prefect.flow_run("SCHEDULED", scheduled_in_s=60)
    other = await prefect.flow_run("SCHEDULED", scheduled_in_s=60)
    first = _checked_create(
        await tasks.call_tool("set_flow_run_state", {"flow_run_id": early, "state": "RUNNING"})
    )
    changes = [
        {"run_type": "flow", "run_id": early, "state": "CANCELLED", "force": True},
        {"run_type": "flow", "run_id": other, "state": "RUNNING"},
    ]
    batch = _checked_create(await tasks.call_tool("submit_state_changes", {"changes": changes}))
    third = _checked_create(
        await tasks.call_tool("set_flow_run_state", {"flow_run_id": early, "state": "PENDING"})
    )
    expected = {
        first["taskId"]: "waiting: Prefect asked to wait, next try in",
        batch["taskId"]: "0 of 2 changes finished: 2 waiting",
        third["taskId"]: "waiting: behind 2 earlier changes to this run",
    }
    with anyio.fail_after(30):
        while True:
            seen = {task_id: (await tasks.get(task_id)).result for task_id in expected}
            for task in seen.values():
                assert_valid("GetTaskResult", task)
                assert task["status"] == "working"
            if all(seen[i]["statusMessage"].startswith(m) for i, m in expected.items()):
                break
            await anyio.sleep(min(task["pollIntervalMs"] for task in seen.values()) / 1000)

    ack = await tasks.cancel(batch["taskId"])
    assert_valid("CancelTaskRequest", ack.request)
    assert_valid("CancelTaskResult", ack.result)
    final = _checked_polls(await tasks.poll(batch["taskId"]))
    assert final["status"] == "cancelled", final
    assert final["statusMessage"] == "2 of 2 changes finished: 2 cancelled"
    # A cancelled change holds nothing up: the third now waits behind the first alone.
    behind = (await tasks.get(third["taskId"])).result
    assert behind["statusMessage"] == "waiting: behind 1 earlier change to this run", behind

    # No task here asks for input: an update is acknowledged and ignored.
    update = await tasks.request(
        "tasks/update",
        {"taskId": first["taskId"], "inputResponses": {"name": {"action": "accept"}}},
        tasks=True,
        name=first["taskId"],
    )
    assert_valid("UpdateTaskRequest", update.request)
    assert_valid("UpdateTaskResult", update.result)
    for task_id in (third["taskId"], first["taskId"]):  # the last first: none wakes
        await tasks.cancel(task_id)
        single = _checked_polls(await tasks.poll(task_id))
        assert single["status"] == "cancelled"
        assert single["statusMessage"] == "cancelled: it was never sent to Prefect"
    for run in (early, other):
        assert (await prefect.state("flow", run))["type"] == "SCHEDULED"


async def test_a_second_replica_answers_for_the_first(
    frontends: Frontends, prefect: PrefectRuns
) -> None:
    task_run = await _running_task_run(prefect)
    async with TasksClient(frontends.url) as one, TasksClient(frontends.replica_url) as other:
        created = _checked_create(
            await one.call_tool(
                "set_task_run_state", {"task_run_id": task_run, "state": "COMPLETED"}
            )
        )
        final = _checked_polls(await other.poll(created["taskId"]))
    assert final["status"] == "completed"
    assert final["result"]["structuredContent"]["status"] == "applied"


async def test_another_clients_task_is_unknown(frontends: Frontends, prefect: PrefectRuns) -> None:
    url = frontends.secured_url
    flow_run = await prefect.flow_run("SCHEDULED", scheduled_in_s=60)  # stays pending
    async with TasksClient(url, token=ALICE) as alice, TasksClient(url, token=BOB) as bob:
        created = _checked_create(
            await alice.call_tool(
                "set_flow_run_state", {"flow_run_id": flow_run, "state": "RUNNING"}
            )
        )
        for exchange in (await bob.get(created["taskId"]), await bob.cancel(created["taskId"])):
            assert_valid("TaskNotFoundError", exchange.response)
        waiting = await _until_waiting(alice, created["taskId"])
        assert waiting["status"] == "working"
        await alice.cancel(created["taskId"])
        assert (await alice.get(created["taskId"])).result["status"] == "cancelled"


async def test_get_job_sends_progress_while_it_waits(
    frontends: Frontends, prefect: PrefectRuns
) -> None:
    """A plain client that asks for progress hears each status change while get_job waits."""
    flow_run = await prefect.flow_run("SCHEDULED", scheduled_in_s=3)  # WAIT, then accepted
    heard: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        heard.append((progress, message))

    async with Client(frontends.url) as client:
        ticket = await client.call_tool(
            "set_flow_run_state", {"flow_run_id": flow_run, "state": "RUNNING"}
        )
        assert ticket.structured_content is not None
        result = await client.call_tool(
            "get_job",
            {"job_id": ticket.structured_content["job_id"], "wait_s": 30},
            progress_callback=on_progress,
        )
    assert result.structured_content is not None
    assert result.structured_content["status"] == "applied"
    assert [progress for progress, _ in heard] == list(range(1, len(heard) + 1))
    messages = [message or "" for _, message in heard]
    assert any(m.startswith("waiting: Prefect asked to wait, next try in") for m in messages)
    assert len(messages) >= 2, messages  # the wait, and the try after it


async def test_tasks_methods_without_the_capability_are_32003(tasks: TasksClient) -> None:
    # The spec: a request that does not declare the extension gets the error that
    # names it, whatever the task id.
    for method in ("tasks/get", "tasks/cancel", "tasks/update"):
        exchange = await tasks.request(method, {"taskId": "0" * 32}, tasks=False, name="0" * 32)
        assert_valid("MissingRequiredClientCapabilityError", exchange.response)
        assert exchange.error["code"] == -32003, method
