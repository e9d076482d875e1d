"""Calling tools through the real MCP client, with the checks every test needs."""

from typing import Any

from mcp import Client

from worker.contract import TERMINAL_STATUSES


async def ok(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    """Call a tool that must succeed; return its structured result."""
    result = await client.call_tool(tool, args)
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert not result.is_error, f"{tool}({args}) failed: {text}"
    assert result.structured_content is not None
    return dict(result.structured_content)


async def error(client: Client, tool: str, **args: Any) -> str:
    """Call a tool that must fail; return its error text."""
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool}({args}) unexpectedly succeeded: {result.structured_content}"
    return " ".join(getattr(c, "text", "") for c in result.content)


async def wait_terminal(client: Client, job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Long-poll get_job until the job is terminal or `timeout_s` passes."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        job = await ok(client, "get_job", job_id=job_id, wait_s=min(30.0, max(remaining, 0.1)))
        if job["status"] in TERMINAL_STATUSES or remaining <= 0:
            assert job["status"] in TERMINAL_STATUSES, f"job not terminal in {timeout_s} s: {job}"
            return job
