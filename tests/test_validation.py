"""Bad input is a tool error naming the field and the rule, and nothing is written."""

import time
from typing import Any, cast

import pytest
from mcp import Client

from mcp_frontend.devstack import free_port
from mcp_frontend.server import build_server
from tests.conftest import Stack
from tests.mcp_calls import error, ok
from worker.contract import QUEUE_KEY

RUN_ID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
UNKNOWN_JOB = "0" * 32

BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("set_task_run_state", {"task_run_id": "not-a-uuid", "state": "RUNNING"}, "task_run_id"),
    ("set_task_run_state", {"task_run_id": "", "state": "RUNNING"}, "task_run_id"),
    ("set_task_run_state", {"task_run_id": "1234", "state": "RUNNING"}, "task_run_id"),
    ("set_task_run_state", {"task_run_id": RUN_ID + "0", "state": "RUNNING"}, "task_run_id"),
    ("set_task_run_state", {"task_run_id": 42, "state": "RUNNING"}, "task_run_id"),
    ("set_task_run_state", {"state": "RUNNING"}, "task_run_id"),
    ("set_flow_run_state", {"flow_run_id": "xyz", "state": "RUNNING"}, "flow_run_id"),
    ("set_flow_run_state", {"flow_run_id": None, "state": "RUNNING"}, "flow_run_id"),
    ("set_task_run_state", {"task_run_id": RUN_ID, "state": "DONE"}, "state"),
    ("set_task_run_state", {"task_run_id": RUN_ID, "state": ""}, "state"),
    ("set_task_run_state", {"task_run_id": RUN_ID, "state": "Retrying"}, "state"),
    ("set_task_run_state", {"task_run_id": RUN_ID, "state": "RUN NING"}, "state"),
    ("set_task_run_state", {"task_run_id": RUN_ID, "state": None}, "state"),
    ("set_flow_run_state", {"flow_run_id": RUN_ID}, "state"),
    (
        "set_task_run_state",
        {"task_run_id": RUN_ID, "state": "RUNNING", "message": "x" * 4001},
        "message",
    ),
    ("set_task_run_state", {"task_run_id": RUN_ID, "state": "RUNNING", "message": 7}, "message"),
    ("set_task_run_state", {"task_run_id": RUN_ID, "state": "RUNNING", "force": "yes"}, "force"),
    ("set_task_run_state", {"task_run_id": RUN_ID, "state": "RUNNING", "force": 1}, "force"),
    (
        "set_task_run_state",
        {"task_run_id": RUN_ID, "state": "RUNNING", "idempotency_key": ""},
        "idempotency_key",
    ),
    (
        "set_flow_run_state",
        {"flow_run_id": RUN_ID, "state": "RUNNING", "idempotency_key": "a b"},
        "idempotency_key",
    ),
    (
        "set_flow_run_state",
        {"flow_run_id": RUN_ID, "state": "RUNNING", "idempotency_key": "k" * 129},
        "idempotency_key",
    ),
    ("get_job", {"job_id": "nope"}, "job_id"),
    ("get_job", {"job_id": UNKNOWN_JOB}, "unknown job_id"),
    ("get_job", {"job_id": UNKNOWN_JOB, "wait_s": -1}, "wait_s"),
    ("get_job", {}, "job_id"),
    ("get_jobs", {"job_ids": []}, "job_ids"),
    ("get_jobs", {"job_ids": [UNKNOWN_JOB]}, "unknown job_id"),
    ("get_jobs", {"job_ids": ["bad"]}, "job_ids[0]"),
    ("get_jobs", {"job_ids": [UNKNOWN_JOB] * 1001}, "job_ids"),
    ("cancel_job", {"job_id": UNKNOWN_JOB}, "unknown job_id"),
    ("cancel_job", {"job_id": 5}, "job_id"),
]


@pytest.mark.parametrize(("tool", "args", "names"), BAD_CALLS)
async def test_bad_input_is_a_clear_error_and_writes_nothing(
    stack: Stack, tool: str, args: dict[str, Any], names: str
) -> None:
    async with Client(build_server(stack.settings)) as client:
        message = await error(client, tool, **args)
    assert names in message
    assert stack.redis.dbsize() == 0


async def test_rule_is_stated_in_the_message(stack: Stack) -> None:
    async with Client(build_server(stack.settings)) as client:
        uuid_msg = await error(client, "set_task_run_state", task_run_id="x", state="RUNNING")
        state_msg = await error(client, "set_task_run_state", task_run_id=RUN_ID, state="DONE")
        size_msg = await error(
            client, "set_flow_run_state", flow_run_id=RUN_ID, state="FAILED", message="m" * 5000
        )
    assert "must be a UUID" in uuid_msg and "nothing was queued" in uuid_msg
    assert "must be one of SCHEDULED, PENDING, RUNNING" in state_msg and "'DONE'" in state_msg
    assert "at most 4000 characters, got 5000" in size_msg


async def test_state_is_case_insensitive(stack: Stack) -> None:
    async with Client(build_server(stack.settings)) as client:
        tickets = [
            await ok(client, "set_task_run_state", task_run_id=RUN_ID, state=spelling)
            for spelling in ("completed", "Completed", " COMPLETED ")
        ]
    assert {t["state"] for t in tickets} == {"COMPLETED"}


async def test_a_stored_job_is_its_record_and_a_queue_entry_nothing_pickled(
    stack: Stack,
) -> None:
    async with Client(build_server(stack.settings)) as client:
        ticket = await ok(
            client,
            "set_flow_run_state",
            flow_run_id=RUN_ID.upper(),
            state="cancelled",
            message="stop",
        )
    job_id = ticket["job_id"]
    # No payload key of any kind beside the record: nothing a worker would deserialize.
    keys = {key.decode() for key in cast(list[bytes], stack.redis.keys(f"*{job_id}*"))}
    assert keys == {f"pmq:job:{job_id}"}, keys
    stored = cast(dict[bytes, bytes], stack.redis.hgetall(f"pmq:job:{job_id}"))
    record = {k.decode(): v.decode() for k, v in stored.items()}
    assert record["status"] == "queued"
    assert record["run_id"] == RUN_ID  # canonical lowercase form
    assert record["state"] == "CANCELLED" and record["message"] == "stop"
    assert stack.redis.zscore(QUEUE_KEY, job_id) is not None


async def test_full_queue_refuses_and_writes_nothing(services: Any) -> None:
    from tests.conftest import make_stack

    small = make_stack(services, max_queue_depth=2)
    async with Client(build_server(small.settings)) as client:
        for _ in range(2):
            await ok(client, "set_task_run_state", task_run_id=RUN_ID, state="RUNNING")
        keys_before = small.redis.dbsize()
        message = await error(client, "set_task_run_state", task_run_id=RUN_ID, state="FAILED")
    assert "queue full" in message and "retry later" in message
    assert small.redis.dbsize() == keys_before
    assert small.redis.zcard(QUEUE_KEY) == 2
    small.stop()
    small.flush()


async def test_unreachable_redis_is_a_prompt_tool_error(stack: Stack) -> None:
    nowhere = stack.settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "redis_timeout_s": 1.0}
    )
    async with Client(build_server(nowhere)) as client:
        started = time.monotonic()
        message = await error(client, "set_task_run_state", task_run_id=RUN_ID, state="RUNNING")
        poll = await error(client, "get_job", job_id=UNKNOWN_JOB)
    assert "job store (Redis) unavailable" in message and "may or may not be stored" in message
    assert "Resending it with the same idempotency_key is safe" in message
    assert "job store (Redis) unavailable" in poll and "retry later" in poll
    assert time.monotonic() - started < 10


async def test_tool_annotations_tell_the_truth(stack: Stack) -> None:
    async with Client(build_server(stack.settings)) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) >= {
        "set_task_run_state",
        "set_flow_run_state",
        "get_job",
        "get_jobs",
        "cancel_job",
        "list_jobs",
    }
    hints = {name: tool.annotations for name, tool in tools.items()}
    assert all(hint is not None for hint in hints.values())
    read_only = {name for name, hint in hints.items() if hint and hint.read_only_hint}
    assert read_only == {"get_job", "get_jobs", "list_jobs"}
    for name in ("set_task_run_state", "get_job"):
        assert tools[name].output_schema is not None
