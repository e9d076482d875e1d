"""Bearer tokens on the HTTP frontend: 401s, per-client isolation, safe binds."""

import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_frontend.devstack import BIN_DIR, Service, free_port, pmq_service
from tests.conftest import Stack
from tests.mcp_calls import error, ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from tests.tasks_client import TasksClient

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"},
    },
}


def start_frontend(stack: Stack, port: int, *args: str, **env: str) -> Service:
    frontend = pmq_service(
        f"frontend-{port}",
        ["serve", "--transport", "http", "--port", str(port), *args],
        env={**stack.env(), **env},
        log_path=stack.services.tmp / "logs" / f"auth-{port}.log",
    )
    frontend.start()
    stack.workers.append(frontend)  # stopped with the stack
    frontend.wait_ready(lambda: _status(f"http://127.0.0.1:{port}/healthz") == 200, 30)
    return frontend


@pytest.fixture
def secured(stack: Stack) -> Iterator[tuple[str, Service]]:
    port = free_port()
    frontend = start_frontend(stack, port, PMQ_AUTH_TOKENS=f"{ALICE}:alice,{BOB}:bob")
    yield f"http://127.0.0.1:{port}/mcp", frontend


@asynccontextmanager
async def as_client(url: str, token: str) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        yield client


def _status(url: str, **kwargs: object) -> int:
    try:
        return httpx.get(url, timeout=2, **kwargs).status_code  # type: ignore[arg-type]
    except httpx.HTTPError:
        return 0


def test_missing_or_wrong_token_is_401(secured: tuple[str, Service]) -> None:
    url, _ = secured
    headers = {"Accept": "application/json, text/event-stream"}
    missing = httpx.post(url, json=INITIALIZE, headers=headers, timeout=5)
    wrong = httpx.post(
        url,
        json=INITIALIZE,
        headers={**headers, "Authorization": "Bearer not-a-real-token-x"},
        timeout=5,
    )
    right = httpx.post(
        url, json=INITIALIZE, headers={**headers, "Authorization": f"Bearer {ALICE}"}, timeout=5
    )
    assert missing.status_code == 401 and "Bearer" in missing.headers["WWW-Authenticate"]
    assert wrong.status_code == 401
    assert right.status_code == 200
    # Static tokens have no authorization server: advertising one (it answered 404,
    # and named the bind address 0.0.0.0 in compose) sent OAuth clients astray.
    assert "resource_metadata" not in missing.headers["WWW-Authenticate"]
    base = url.removesuffix("/mcp")
    assert _status(base + "/.well-known/oauth-protected-resource/mcp") == 404


async def test_each_client_sees_only_its_own_jobs(
    stack: Stack, secured: tuple[str, Service], prefect: PrefectRuns
) -> None:
    url, frontend = secured
    stack.start_worker()
    flow_run = await prefect.flow_run()
    change = {"flow_run_id": flow_run, "state": "RUNNING", "idempotency_key": "step-1"}
    async with as_client(url, ALICE) as alice, as_client(url, BOB) as bob:
        ticket = await ok(alice, "set_flow_run_state", **change)
        job_id = ticket["job_id"]
        assert (await wait_terminal(alice, job_id))["status"] == "applied"
        unknown = f"unknown job_id {'0' * 32}"
        calls: list[tuple[str, dict[str, Any]]] = [
            ("get_job", {"job_id": job_id}),
            ("get_job", {"job_id": job_id, "wait_s": 1}),
            ("get_jobs", {"job_ids": [job_id]}),
            ("cancel_job", {"job_id": job_id}),
        ]
        for tool, args in calls:
            message = await error(bob, tool, **args)
            assert message == (await error(bob, tool, **{**args, **_other_id(args)})).replace(
                "0" * 32, job_id
            ), message
            assert unknown.replace("0" * 32, job_id) in message
        # Idempotency keys are per client: Bob's "step-1" is his own, new job.
        bobs = await ok(bob, "set_flow_run_state", **{**change, "state": "FAILED"})
        assert bobs["job_id"] != job_id and not bobs["deduplicated"]
        assert (await ok(alice, "set_flow_run_state", **change))["job_id"] == job_id
    log = frontend.log_path.read_text()
    assert ALICE not in log and BOB not in log


def _other_id(args: dict[str, Any]) -> dict[str, Any]:
    """The same call about a job id that never existed."""
    if "job_ids" in args:
        return {"job_ids": ["0" * 32]}
    return {"job_id": "0" * 32}


def test_tokens_from_a_file_and_allowed_hosts(stack: Stack, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# one per line\n{ALICE}:alice\n")
    port = free_port()
    start_frontend(
        stack,
        port,
        "--host",
        "0.0.0.0",
        PMQ_AUTH_TOKENS_FILE=str(tokens),
        PMQ_ALLOWED_HOSTS="mcp.example.test:*",
    )
    url = f"http://127.0.0.1:{port}/mcp"
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {ALICE}"}
    good = httpx.post(url, json=INITIALIZE, headers={**headers, "Host": f"mcp.example.test:{port}"})
    rebound = httpx.post(url, json=INITIALIZE, headers={**headers, "Host": "evil.example:80"})
    assert good.status_code == 200
    assert rebound.status_code == 421


def test_non_loopback_bind_needs_tokens_or_an_explicit_open(stack: Stack) -> None:
    refused = subprocess.run(
        [str(BIN_DIR / "pmq"), "serve", "--transport", "http", "--host", "0.0.0.0"],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2 and "PMQ_AUTH_TOKENS" in refused.stderr
    short = subprocess.run(
        [str(BIN_DIR / "pmq"), "serve", "--transport", "http"],
        env={**stack.env(), "PMQ_AUTH_TOKENS": "short:alice"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert short.returncode == 2 and "at least 16 characters" in short.stderr
    assert "short" not in short.stderr.replace("at least", "")
    port = free_port()
    start_frontend(stack, port, "--host", "0.0.0.0", PMQ_ALLOW_OPEN="true")
    assert _status(f"http://127.0.0.1:{port}/healthz") == 200


def test_pmq_token_new_prints_a_token_once_and_a_line_that_holds_only_its_digest(
    stack: Stack, tmp_path: Path
) -> None:
    made = subprocess.run(
        [str(BIN_DIR / "pmq"), "token", "new", "--client", "fleet-a", "--role", "reader"],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = made.stdout.splitlines()[0].rpartition(": ")[2]
    line = made.stdout.splitlines()[1].rpartition(": ")[2]
    assert token.startswith("pmq_") and len(token) >= 40
    assert line.startswith("hmac-sha256.") and line.endswith(":fleet-a:reader")
    assert token not in line
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# made by pmq token new\n{line}\n")
    port = free_port()
    frontend = start_frontend(stack, port, PMQ_AUTH_TOKENS_FILE=str(tokens))
    url = f"http://127.0.0.1:{port}/mcp"
    headers = {"Accept": "application/json, text/event-stream"}
    right = httpx.post(
        url, json=INITIALIZE, headers={**headers, "Authorization": f"Bearer {token}"}
    )
    # The digest is not a token: presenting the file's content gets nothing.
    digest = line.split(":")[0]
    stolen = httpx.post(
        url, json=INITIALIZE, headers={**headers, "Authorization": f"Bearer {digest}"}
    )
    assert right.status_code == 200 and stolen.status_code == 401
    assert digest not in frontend.log_path.read_text()

    bad = tmp_path / "bad-tokens"
    bad.write_text(f"{line}\n{token}:fleet-b:superuser\n")
    refused = subprocess.run(
        [str(BIN_DIR / "pmq"), "serve", "--transport", "http", "--port", str(free_port())],
        env={**stack.env(), "PMQ_AUTH_TOKENS_FILE": str(bad)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert f"{bad} line 2: unknown role 'superuser'" in refused.stderr
    assert token not in refused.stderr


async def test_client_b_finds_no_trace_of_client_as_jobs_in_any_answer(
    stack: Stack, prefect: PrefectRuns
) -> None:
    bob_reader = "bob-reader-0123456789abcdef"
    port = free_port()
    start_frontend(stack, port, PMQ_AUTH_TOKENS=f"{ALICE}:alice,{BOB}:bob,{bob_reader}:bob:reader")
    base = f"http://127.0.0.1:{port}"
    flow_run = await prefect.flow_run()
    change = {"run_type": "flow", "run_id": flow_run, "state": "RUNNING"}
    async with TasksClient(f"{base}/mcp", token=ALICE) as alice:
        job_id = (
            await alice.call_tool(
                "set_flow_run_state", {"flow_run_id": flow_run, "state": "RUNNING"}, tasks=False
            )
        ).result["structuredContent"]["job_id"]
        batch_id = (await alice.call_tool("submit_state_changes", {"changes": [change]})).result[
            "taskId"
        ]
    never = "0" * 32
    for token in (BOB, bob_reader):
        async with TasksClient(f"{base}/mcp", token=token) as bob:
            for method in ("tasks/get", "tasks/cancel", "tasks/update"):
                for task_id, unknown in ((job_id, never), (batch_id, "batch-" + never)):
                    params = {"taskId": task_id}
                    theirs = (await bob.request(method, params, tasks=True, name=task_id)).response
                    none = (
                        await bob.request(method, {"taskId": unknown}, tasks=True, name=unknown)
                    ).response
                    if token == bob_reader and method != "tasks/get":
                        # Refused for the role before any lookup: the same either way.
                        assert theirs["error"]["code"] == -32030
                    assert theirs["error"] == none["error"], (method, theirs)
            listed = (await bob.call_tool("list_jobs", {}, tasks=False)).result
            assert job_id not in str(listed) and "alice" not in str(listed)
            for tool, args in [
                ("get_job", {"job_id": job_id}),
                ("get_jobs", {"job_ids": [job_id]}),
            ]:
                answer = str((await bob.call_tool(tool, args, tasks=False)).result)
                assert "alice" not in answer and flow_run not in answer, (tool, answer)
        # The dashboard shows every client: an agent's or a reader's token gets 403, no data.
        for path in ("/dashboard", "/dashboard/api/snapshot"):
            refused = httpx.get(base + path, headers={"Authorization": f"Bearer {token}"})
            assert refused.status_code == 403
            assert job_id not in refused.text and "alice" not in refused.text
