"""Pushed task status: `subscriptions/listen` -> `notifications/tasks`, end to end.

`pmq serve` replicas over streamable HTTP, a real worker and Prefect; every
message is checked against tests/data/mcp-tasks-extension.schema.json.
"""

import contextlib
import copy
import itertools
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import httpx
import pytest

from tests.conftest import Stack
from tests.prefect_runs import PrefectRuns
from tests.tasks_client import Frontends, ListenStream, TasksClient
from tests.tasks_schema import assert_valid
from worker.contract import STATUS_CHANNEL, TERMINAL_CHANNEL

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"
OPS = "ops-token-0123456789abcdef00"
SUBSCRIPTION_ID = "io.modelcontextprotocol/subscriptionId"
TERMINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def frontends(worked_stack: Stack) -> Frontends:
    return Frontends.start(worked_stack, f"{ALICE}:alice,{BOB}:bob,{OPS}:ops:operator")


@pytest.fixture
async def tasks(frontends: Frontends) -> AsyncIterator[TasksClient]:
    async with TasksClient(frontends.url) as client:
        yield client


async def _created(client: TasksClient, tool: str, arguments: dict[str, Any]) -> str:
    exchange = await client.call_tool(tool, arguments)
    assert_valid("CreateTaskResult", exchange.result)
    return str(exchange.result["taskId"])


def _checked_stream(stream: ListenStream, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The notifications/tasks params of a whole listen stream, each frame checked on the way."""
    listen_id = stream.request["id"]
    assert_valid("SubscriptionsListenRequest", stream.request)
    assert stream.is_event_stream
    ack, *pushed, closed = messages
    assert_valid("SubscriptionsAcknowledgedNotification", ack)
    assert ack["params"]["_meta"][SUBSCRIPTION_ID] == listen_id
    for notification in pushed:
        assert_valid("ListenedTaskStatusNotification", notification)
        assert notification["params"]["_meta"][SUBSCRIPTION_ID] == listen_id
    assert_valid("SubscriptionsListenResultResponse", closed)
    assert closed["id"] == listen_id
    assert closed["result"]["_meta"][SUBSCRIPTION_ID] == listen_id
    return [notification["params"] for notification in pushed]


def _task(message: dict[str, Any]) -> dict[str, Any]:
    """The task a tasks/get result or a notification's params carry: without what
    belongs to the envelope (`resultType`, `_meta`)."""
    return {k: v for k, v in message.items() if k not in ("resultType", "_meta")}


def _by_task(pushed: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    per_task: dict[str, list[dict[str, Any]]] = {}
    for task in pushed:
        per_task.setdefault(task["taskId"], []).append(task)
    return per_task


async def _until_pushed(
    stream: ListenStream, seen: list[dict[str, Any]], task_id: str, message_prefix: str
) -> dict[str, Any]:
    """The push of `task_id` with that message, among those in `seen` or, reading on (each
    message kept in `seen`), the next ones."""

    def wanted(message: dict[str, Any]) -> bool:
        params = message.get("params", {})
        return bool(
            params.get("taskId") == task_id and params["statusMessage"].startswith(message_prefix)
        )

    while not any(map(wanted, seen)):
        try:
            seen.append(await stream.next())
        except TimeoutError:
            heard = [(m["params"].get("taskId"), m["params"].get("statusMessage")) for m in seen]
            raise AssertionError(f"no {message_prefix!r} for {task_id}; heard {heard}") from None
    return dict(next(m for m in seen if wanted(m))["params"])


async def test_a_listen_on_one_replica_hears_a_task_created_on_another(
    frontends: Frontends, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("SCHEDULED", scheduled_in_s=3)  # WAIT, then accepted
    async with TasksClient(frontends.url) as one, TasksClient(frontends.replica_url) as other:
        task_id = await _created(
            other, "set_flow_run_state", {"flow_run_id": flow_run, "state": "RUNNING"}
        )
        async with one.listen([task_id]) as stream:
            messages = await stream.until_closed()
        after = (await other.get(task_id)).result

    methods = [m.get("method") for m in messages[:-1]]
    assert methods == ["notifications/subscriptions/acknowledged"] + ["notifications/tasks"] * (
        len(messages) - 2
    ), methods  # nothing else rides the stream: no progress, no log messages
    assert messages[0]["params"]["notifications"] == {"taskIds": [task_id]}
    pushed = _checked_stream(stream, messages)
    assert {task["taskId"] for task in pushed} == {task_id}
    assert [task["status"] for task in pushed[:-1]] == ["working"] * (len(pushed) - 1)
    assert any(t["statusMessage"].startswith("waiting: Prefect asked to wait") for t in pushed)
    assert all(a != b for a, b in itertools.pairwise(pushed)), pushed
    final = pushed[-1]
    assert final["status"] == "completed", final
    assert final["result"]["structuredContent"]["status"] == "applied"
    assert _task(final) == _task(after)  # what tasks/get on the other replica says now


async def test_each_push_is_what_tasks_get_answers_and_the_stream_ends_after_the_last_terminal(
    tasks: TasksClient, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("SCHEDULED", scheduled_in_s=60)  # WAIT for a minute
    first = await _created(
        tasks, "set_flow_run_state", {"flow_run_id": flow_run, "state": "RUNNING"}
    )
    second = await _created(
        tasks,
        "set_flow_run_state",
        {"flow_run_id": flow_run, "state": "CANCELLED", "force": True},
    )
    seen: list[dict[str, Any]] = []
    async with tasks.listen([first, second]) as stream:
        seen.append(await stream.next())
        assert seen[0]["params"]["notifications"] == {"taskIds": [first, second]}
        blocked = await _until_pushed(stream, seen, second, "waiting: behind 1 earlier change")
        now = (await tasks.get(second)).result
        # pollIntervalMs follows the fleet's finish rate, sampled once a second: the
        # spec lets it change at any time. Everything else is the same answer.
        assert _task(blocked) | {"pollIntervalMs": 0} == _task(now) | {"pollIntervalMs": 0}
        await _until_pushed(stream, seen, first, "waiting: Prefect asked to wait")

        await tasks.cancel(first)  # the second, behind it, then goes to Prefect
        seen += await stream.until_closed()

    per_task = _by_task(_checked_stream(stream, seen))
    assert per_task[first][-1]["status"] == "cancelled"
    assert per_task[second][-1]["status"] == "completed"
    for task_id, pushed in per_task.items():
        # The terminal notification is each task's last, and what tasks/get says since.
        assert [t["status"] in TERMINAL for t in pushed] == [False] * (len(pushed) - 1) + [True]
        assert _task(pushed[-1]) == _task((await tasks.get(task_id)).result)
    assert (await prefect.state("flow", flow_run))["type"] == "CANCELLED"


async def test_a_batch_task_is_pushed_as_its_jobs_change(
    frontends: Frontends, prefect: PrefectRuns
) -> None:
    task_run = await prefect.task_run(await prefect.flow_run("RUNNING"))
    later = await prefect.flow_run("SCHEDULED", scheduled_in_s=3)  # keeps the batch working
    changes = [
        {"run_type": "task", "run_id": task_run, "state": "COMPLETED"},
        {"run_type": "flow", "run_id": later, "state": "RUNNING"},
    ]
    async with TasksClient(frontends.replica_url) as client:
        batch = await _created(client, "submit_state_changes", {"changes": changes})
        async with client.listen([batch]) as stream:
            messages = await stream.until_closed()
        after = (await client.get(batch)).result

    pushed = _checked_stream(stream, messages)
    assert messages[0]["params"]["notifications"] == {"taskIds": [batch]}
    assert len(pushed) >= 2, pushed  # the batch was still working when the listen opened
    assert [t["status"] for t in pushed[:-1]] == ["working"] * (len(pushed) - 1)
    final = pushed[-1]
    assert final["statusMessage"] == "2 of 2 changes finished: 2 applied", final
    assert [job["run_id"] for job in final["result"]["structuredContent"]["jobs"]] == [
        task_run,
        later,
    ]
    assert _task(final) == _task(after)


async def test_another_clients_task_is_never_acknowledged_and_says_nothing(
    frontends: Frontends, prefect: PrefectRuns
) -> None:
    url = frontends.secured_url
    async with TasksClient(url, token=ALICE) as alice, TasksClient(url, token=BOB) as bob:
        alices, bobs = [
            await _created(
                client,
                "set_flow_run_state",
                {
                    "flow_run_id": await prefect.flow_run("SCHEDULED", scheduled_in_s=60),
                    "state": "RUNNING",
                },
            )
            for client in (alice, bob)
        ]
        unknown = ["0" * 32, "batch-" + "0" * 32, "not-a-task-id"]
        seen: list[dict[str, Any]] = []
        async with bob.listen([alices, *unknown, bobs]) as stream:
            seen.append(await stream.next())
            assert seen[0]["params"]["notifications"] == {"taskIds": [bobs]}
            await _until_pushed(stream, seen, bobs, "waiting: Prefect asked to wait")
            await alice.cancel(alices)  # a status change of Alice's, while Bob listens
            assert (await alice.get(alices)).result["status"] == "cancelled"
            await bob.cancel(bobs)
            seen += await stream.until_closed()
        assert {t["taskId"] for t in _checked_stream(stream, seen)} == {bobs}
        assert alices not in repr(seen)

        # Alice's id and an id nobody has are answered alike, frame for frame.
        answers = []
        for task_id in (alices, "1" * 32):
            async with bob.listen([task_id]) as stream:
                messages = await stream.until_closed()
            assert _checked_stream(stream, messages) == []
            answers.append([_anonymous(message) for message in messages])
        assert answers[0] == answers[1]
        assert answers[0][0]["params"]["notifications"] == {}  # none acknowledged: no key


def _anonymous(message: dict[str, Any]) -> dict[str, Any]:
    """`message` without the listen's own request id, which differs from request to request."""
    blanked = copy.deepcopy(message)
    if "id" in blanked:
        blanked["id"] = 0
    for part in (blanked.get("params", {}), blanked.get("result", {})):
        if "_meta" in part:
            part["_meta"][SUBSCRIPTION_ID] = 0
    return blanked


async def test_a_listen_for_tasks_without_the_capability_is_32003(
    tasks: TasksClient, frontends: Frontends, prefect: PrefectRuns
) -> None:
    task_run = await prefect.task_run(await prefect.flow_run("RUNNING"))
    task_id = await _created(
        tasks, "set_task_run_state", {"task_run_id": task_run, "state": "COMPLETED"}
    )
    for task_ids in ([task_id], [], ["0" * 32]):
        async with tasks.listen(task_ids, tasks=False) as stream:
            (refusal,) = [message async for message in stream]
        assert not stream.is_event_stream
        assert_valid("MissingRequiredClientCapabilityError", refusal)
        assert refusal["error"] == {
            "code": -32003,
            "message": "Missing required client capability",
            "data": {"requiredCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}}},
        }

    # A role without the right to read is refused as tasks/get refuses it.
    async with TasksClient(frontends.secured_url, token=OPS) as operator:
        async with operator.listen(["0" * 32]) as stream:
            (forbidden,) = [message async for message in stream]
    assert forbidden["error"]["code"] == -32030, forbidden
    assert "lacks the right 'read'" in forbidden["error"]["message"]


async def test_more_task_ids_than_the_cap_is_invalid_params_naming_it(tasks: TasksClient) -> None:
    async with tasks.listen([f"{n:032x}" for n in range(101)]) as stream:
        (refusal,) = [message async for message in stream]
    assert refusal["error"]["code"] == -32602
    assert "at most 100 task ids" in refusal["error"]["message"], refusal


async def test_a_listen_without_task_ids_is_left_to_the_sdk(tasks: TasksClient) -> None:
    async with tasks.listen(None, tasks=False, toolsListChanged=True) as stream:
        ack = await stream.next()
    assert ack["method"] == "notifications/subscriptions/acknowledged"
    assert ack["params"]["notifications"] == {"toolsListChanged": True}


async def test_many_listens_share_one_subscription_and_an_abandoned_one_lets_go(
    stack: Stack,
) -> None:
    """No worker: every task stays queued, so every listen stays open until abandoned."""
    _, port = stack.start_frontend()
    url = f"http://127.0.0.1:{port}/mcp"
    subscribers_before = _subscribers(stack)
    async with TasksClient(url) as client, contextlib.AsyncExitStack() as listens:
        task_ids = [
            await _created(
                client,
                "set_task_run_state",
                {"task_run_id": f"{n:08x}-0000-4000-8000-000000000000", "state": "RUNNING"},
            )
            for n in range(20)
        ]
        for task_id in task_ids:
            stream = await listens.enter_async_context(client.listen([task_id]))
            ack, snapshot = await stream.next(), await stream.next()
            assert ack["params"]["notifications"] == {"taskIds": [task_id]}
            assert snapshot["params"]["statusMessage"].startswith("queued"), snapshot
        assert await _own_metrics(port) == {
            "pmq_frontend_task_listens": 20.0,
            "pmq_frontend_job_waits": 20.0,
        }
        # One subscription of this process's, on the two status channels, for all 20.
        assert _subscribers(stack) == {
            channel: count + 1 for channel, count in subscribers_before.items()
        }
        clients = cast(list[dict[str, Any]], stack.redis.client_list())
        ours = [c for c in clients if int(c["db"]) == stack.db and int(c["sub"])]
        assert [int(c["sub"]) for c in ours] == [2], ours
    # The client went away mid-stream: each listen ends and lets its waiter go.
    with anyio.fail_after(30):
        while await _own_metrics(port) != {
            "pmq_frontend_task_listens": 0.0,
            "pmq_frontend_job_waits": 0.0,
        }:
            await anyio.sleep(0.05)
    assert _subscribers(stack) == {c: n + 1 for c, n in subscribers_before.items()}


def _subscribers(stack: Stack) -> dict[str, int]:
    numsub = cast(
        list[tuple[bytes, int]], stack.redis.pubsub_numsub(STATUS_CHANNEL, TERMINAL_CHANNEL)
    )
    return {channel.decode(): int(count) for channel, count in numsub}


async def _own_metrics(port: int) -> dict[str, float]:
    """This frontend process's listen and waiter gauges, from its /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    wanted = ("pmq_frontend_task_listens", "pmq_frontend_job_waits")
    return {
        name: float(value)
        for name, value in (
            line.split(" ") for line in text.splitlines() if line.startswith(wanted)
        )
    }


async def test_a_listen_is_held_no_longer_than_a_long_poll_then_closed_gracefully(
    stack: Stack,
) -> None:
    """No worker: the task stays queued, and the listen ends at PMQ_MAX_WAIT_S all the same."""
    _, port = stack.start_frontend(max_wait_s=1)
    async with TasksClient(f"http://127.0.0.1:{port}/mcp") as client:
        task_id = await _created(
            client,
            "set_task_run_state",
            {"task_run_id": "00000000-0000-4000-8000-000000000000", "state": "RUNNING"},
        )
        snapshots = []
        for _ in range(2):  # closed, then listened to again: the state comes at once
            async with client.listen([task_id]) as stream:
                with anyio.fail_after(10):
                    (snapshot,) = _checked_stream(stream, await stream.until_closed())
            snapshots.append(_task(snapshot))
        assert snapshots[0]["statusMessage"] == "queued: next in line for a worker"
        assert snapshots[0] == snapshots[1] == _task((await client.get(task_id)).result)
