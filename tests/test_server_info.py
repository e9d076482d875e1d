"""What clients see of the server, in both protocol eras: its version, and only what exists."""

import importlib.metadata

import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from mcp_frontend.server import build_server
from tests.conftest import Stack
from tests.tasks_client import TasksClient
from tests.test_auth import INITIALIZE

VERSION = importlib.metadata.version("prefect-mcp-queue")


async def test_the_2026_era_sees_the_version_and_no_prompts_or_resources(stack: Stack) -> None:
    async with Client(build_server(stack.settings)) as client:
        info, capabilities = client.server_info, client.server_capabilities
        assert info is not None and info.version == VERSION
        assert capabilities is not None
        assert capabilities.prompts is None and capabilities.resources is None
        assert capabilities.tools is not None and capabilities.tools.list_changed is False
        assert capabilities.extensions == {"io.modelcontextprotocol/tasks": {}}
        for call in (client.list_prompts, client.list_resources):
            with pytest.raises(MCPError) as refused:
                await call()
            assert refused.value.error.code == -32601


async def test_server_discover_over_http_says_the_same(stack: Stack) -> None:
    _, port = stack.start_frontend()
    async with TasksClient(f"http://127.0.0.1:{port}/mcp") as client:
        discovered = (await client.request("server/discover", {})).result
    # 2026-07-28 carries serverInfo in the result's _meta.
    assert discovered["_meta"]["io.modelcontextprotocol/serverInfo"]["version"] == VERSION
    assert set(discovered["capabilities"]) == {"tools", "extensions"}
    assert discovered["capabilities"]["tools"] == {"listChanged": False}


def test_the_2025_era_initialize_sees_the_version_and_no_prompts_or_resources(
    stack: Stack,
) -> None:
    _, port = stack.start_frontend()
    reply = httpx.post(
        f"http://127.0.0.1:{port}/mcp",
        json=INITIALIZE,  # protocolVersion 2025-06-18
        headers={"Accept": "application/json, text/event-stream"},
        timeout=10,
    )
    lines = [line for line in reply.text.splitlines() if line.startswith("data:")]
    result = httpx.Response(200, content=lines[0].removeprefix("data:")).json()["result"]
    assert result["serverInfo"]["version"] == VERSION
    assert set(result["capabilities"]) <= {"tools", "extensions", "experimental"}
    assert result["capabilities"]["tools"] == {"listChanged": False}
