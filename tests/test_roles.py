"""Token roles on a real HTTP frontend: each role against each tool, tasks method and route.

The rights are written out here, not derived from the code's own table: this
file is the contract the README's table states.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mcp_frontend.auth import TokenConfigError, load_tokens, parse_tokens
from tests.conftest import Stack
from tests.prefect_runs import PrefectRuns
from tests.tasks_client import TasksClient

AGENT = "acme-agent-0123456789abcdef"
READER = "acme-reader-0123456789abcde"
OPERATOR = "acme-operator-0123456789abc"
TOKENS = {"agent": AGENT, "reader": READER, "operator": OPERATOR}
ALLOWED = {
    "agent": {
        "set_task_run_state",
        "set_flow_run_state",
        "submit_state_changes",
        "get_job",
        "get_jobs",
        "list_jobs",
        "cancel_job",
        "tasks/get",
        "tasks/cancel",
        "tasks/update",
    },
    "reader": {"get_job", "get_jobs", "list_jobs", "tasks/get"},
    "operator": {"/dashboard", "/dashboard/api/snapshot", "/dashboard/static/dashboard.js"},
}
# The right each call needs, as its error names it.
NEEDS = {
    "set_task_run_state": "submit",
    "set_flow_run_state": "submit",
    "submit_state_changes": "submit",
    "get_job": "read",
    "get_jobs": "read",
    "list_jobs": "read",
    "cancel_job": "cancel",
    "tasks/get": "read",
    "tasks/cancel": "cancel",
    "tasks/update": "submit",
    "/dashboard": "dashboard",
    "/dashboard/api/snapshot": "dashboard",
    "/dashboard/static/dashboard.js": "dashboard",
}
FORBIDDEN_CODE = -32030


@dataclass
class Frontend:
    base: str

    @property
    def mcp(self) -> str:
        return self.base + "/mcp"


@pytest.fixture
def frontend(stack: Stack) -> Frontend:
    """No worker: jobs stay queued, so a refused cancel visibly leaves them so."""
    lines = ",".join(f"{token}:acme:{role}" for role, token in TOKENS.items())
    _, port = stack.start_frontend(auth_tokens=lines)
    return Frontend(f"http://127.0.0.1:{port}")


@pytest.fixture
async def agent(frontend: Frontend) -> AsyncIterator[TasksClient]:
    async with TasksClient(frontend.mcp, token=AGENT) as client:
        yield client


def _arguments(call: str, job_id: str, task_run: str, flow_run: str) -> dict[str, Any]:
    arguments: dict[str, dict[str, Any]] = {
        "set_task_run_state": {"task_run_id": task_run, "state": "RUNNING"},
        "set_flow_run_state": {"flow_run_id": flow_run, "state": "RUNNING"},
        "submit_state_changes": {
            "changes": [{"run_type": "flow", "run_id": flow_run, "state": "RUNNING"}]
        },
        "get_job": {"job_id": job_id},
        "get_jobs": {"job_ids": [job_id]},
        "list_jobs": {},
        "cancel_job": {"job_id": job_id},
        "tasks/get": {"taskId": job_id},
        "tasks/cancel": {"taskId": job_id},
        "tasks/update": {"taskId": job_id, "inputResponses": {}},
    }
    return arguments[call]


async def _call(client: TasksClient, call: str, args: dict[str, Any]) -> tuple[bool, str]:
    """(refused for the role?, the text that said so) for a tool or a tasks method."""
    if call.startswith("tasks/"):
        response = (await client.request(call, args, tasks=True, name=args["taskId"])).response
        if "error" in response:
            return response["error"]["code"] == FORBIDDEN_CODE, response["error"]["message"]
        return False, ""
    result = (await client.call_tool(call, args, tasks=False)).result
    text = " ".join(c.get("text", "") for c in result.get("content", []))
    return bool(result.get("isError")) and "forbidden: " in text, text


@pytest.mark.parametrize("role", sorted(TOKENS))
async def test_each_role_against_each_tool_tasks_method_and_route(
    stack: Stack, frontend: Frontend, agent: TasksClient, prefect: PrefectRuns, role: str
) -> None:
    flow_run = await prefect.flow_run()
    task_run = await prefect.task_run(flow_run)
    ticket = await agent.call_tool(
        "set_flow_run_state",
        {"flow_run_id": flow_run, "state": "PENDING", "idempotency_key": f"seed-{role}"},
        tasks=False,
    )
    job_id = ticket.result["structuredContent"]["job_id"]
    async with TasksClient(frontend.mcp, token=TOKENS[role]) as client:
        # Refused calls first: each leaves Redis exactly as it was.
        calls = sorted(NEEDS, key=lambda call: call in ALLOWED[role])
        for call in calls:
            allowed = call in ALLOWED[role]
            before = stack.redis.dbsize()
            if call.startswith("/"):
                status = httpx.get(
                    frontend.base + call,
                    headers={"Authorization": f"Bearer {TOKENS[role]}"},
                    timeout=10,
                ).status_code
                assert status == (200 if allowed else 403), (role, call, status)
                continue
            refused, text = await _call(client, call, _arguments(call, job_id, task_run, flow_run))
            if allowed:
                assert not refused, (role, call, text)
                continue
            assert refused, (role, call, text)
            assert f"role '{role}' lacks the right '{NEEDS[call]}' that {call} needs" in text
            assert stack.redis.dbsize() == before, f"{role} {call} wrote to Redis"
    job = (await agent.call_tool("get_job", {"job_id": job_id}, tasks=False)).result
    # Only an agent may cancel: the others left the job queued.
    expected = "cancelled" if role == "agent" else "queued"
    assert job["structuredContent"]["status"] == expected


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    return path


def test_a_role_suffix_is_a_role_and_bad_lines_stop_start_up_naming_the_line(
    tmp_path: Path,
) -> None:
    entries = parse_tokens(f"{READER}:tenant-a:reader\n{AGENT}:tenant-a", source="f")
    assert [(e.client_id, e.role.value) for e in entries] == [
        ("tenant-a", "reader"),
        ("tenant-a", "agent"),
    ]
    with pytest.raises(TokenConfigError, match="PMQ_AUTH_TOKENS line 1 entry 2: unknown role"):
        parse_tokens(f"{AGENT}:a, {READER}:b:root", source="PMQ_AUTH_TOKENS")
    # Which of two lines would win is an accident of order: start-up refuses both.
    with pytest.raises(TokenConfigError) as twice:
        load_tokens(f"{AGENT}:alice", _file(tmp_path, f"# x\n{AGENT}:bob:operator\n"))
    assert (
        str(twice.value)
        == f"{tmp_path / 'tokens'} line 2: the same token as PMQ_AUTH_TOKENS line 1"
    )
    bad = {
        f"{AGENT}:tenant-a:admin": "f line 3: unknown role 'admin'; roles are agent, reader",
        f"a:{AGENT}:tenant-a:reader": "f line 3: expected token:client_id or token:client_id:role",
        f"{AGENT}:": "f line 3: expected token:client_id",
        f"{AGENT}:tenant a": "f line 3: client id must be",
        "hmac-sha256.short.digest:tenant-a": "f line 3: a digest must be hmac-sha256.",
    }
    for line, message in bad.items():
        with pytest.raises(TokenConfigError) as raised:
            parse_tokens(f"# a comment\n\n{line}", source="f")
        assert message in str(raised.value), line
        assert AGENT not in str(raised.value)
