"""End to end through the real entry points: `pmq serve` over HTTP and stdio, and `pmq dev`."""

import os
import re
import signal
import subprocess
from pathlib import Path

from mcp import Client, StdioServerParameters

from mcp_frontend.devstack import BIN_DIR, free_port
from tests.conftest import Stack, http_healthy, wait_for
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns


async def _apply_one(client: Client, prefect: PrefectRuns) -> None:
    flow_run = await prefect.flow_run("RUNNING")
    task_run = await prefect.task_run(flow_run)
    ticket = await ok(client, "set_task_run_state", task_run_id=task_run, state="RUNNING")
    job = await wait_terminal(client, ticket["job_id"])
    assert job["status"] == "applied", job
    assert (await prefect.state("task", task_run))["type"] == "RUNNING"
    # A named state with its details, on the same transport.
    ticket = await ok(
        client,
        "set_task_run_state",
        task_run_id=task_run,
        state="SCHEDULED",
        name="AwaitingRetry",
        scheduled_time="1m",
    )
    job = await wait_terminal(client, ticket["job_id"])
    assert job["status"] == "applied", job
    current = await prefect.state("task", task_run)
    assert (current["type"], current["name"]) == ("SCHEDULED", "AwaitingRetry")
    assert current["state_details"]["scheduled_time"] is not None


async def test_streamable_http_end_to_end(stack: Stack, prefect: PrefectRuns) -> None:
    _, port = stack.start_frontend()
    stack.start_worker()
    async with Client(f"http://127.0.0.1:{port}/mcp") as client:
        await _apply_one(client, prefect)


async def test_several_http_processes_share_one_port(stack: Stack, prefect: PrefectRuns) -> None:
    frontend, port = stack.start_frontend("--processes", "2", timeout_s=60)
    assert frontend.proc is not None
    children = subprocess.run(
        ["pgrep", "-P", str(frontend.proc.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(children) >= 2, children  # uvicorn's supervisor and its 2 servers
    stack.start_worker()
    for _ in range(3):  # new connections: the kernel may hand each to either process
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            await _apply_one(client, prefect)


async def test_stdio_end_to_end(stack: Stack, prefect: PrefectRuns) -> None:
    stack.start_worker()
    params = StdioServerParameters(
        command=str(BIN_DIR / "pmq"), args=["serve", "--transport", "stdio"], env=stack.env()
    )
    async with Client(params) as client:
        await _apply_one(client, prefect)


async def test_pmq_dev_runs_the_whole_stack_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMQ_", "PREFECT_"))}
    out_path = tmp_path / "dev.out"
    with out_path.open("wb") as out:
        dev = subprocess.Popen(
            [str(BIN_DIR / "pmq"), "dev", "--port", str(port), "--state-dir", str(tmp_path)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "Ctrl-C stops everything" in out_path.read_text(), 120, "pmq dev")
        printed = out_path.read_text()
        url = f"http://127.0.0.1:{port}/mcp"
        assert f"MCP endpoint: {url}" in printed
        assert '"mcpServers"' in printed
        match = re.search(r"Prefect API:\s+(\S+)", printed)
        assert match is not None
        prefect = PrefectRuns(match.group(1))
        async with Client(url) as client:
            await _apply_one(client, prefect)
        await prefect.aclose()
        dev.send_signal(signal.SIGINT)
        assert dev.wait(60) == 0
    finally:
        if dev.poll() is None:
            dev.kill()
    assert not http_healthy(port)
    children = subprocess.run(
        ["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert children.stdout.strip() == "", f"left running: {children.stdout}"
