"""A small MCP client that speaks the tasks extension over streamable HTTP.

It sends the 2026-07-28 per-request envelope by hand, so that tests see (and
can validate) every message on the wire. No published Python client drives
`io.modelcontextprotocol/tasks` yet; the SDK 2.3 client only parses foreign
result shapes through an extension the caller writes.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

PROTOCOL_VERSION = "2026-07-28"
TASKS = "io.modelcontextprotocol/tasks"


@dataclass
class Exchange:
    """One request and everything the server sent back for it."""

    request: dict[str, Any]
    response: dict[str, Any]  # the JSON-RPC response (result or error)
    notifications: list[dict[str, Any]] = field(default_factory=list)

    @property
    def result(self) -> dict[str, Any]:
        assert "result" in self.response, f"expected a result: {self.response}"
        return dict(self.response["result"])

    @property
    def error(self) -> dict[str, Any]:
        assert "error" in self.response, f"expected an error: {self.response}"
        return dict(self.response["error"])


class TasksClient:
    """Posts JSON-RPC requests; `tasks=True` declares the extension on that request."""

    def __init__(self, url: str, *, token: str | None = None) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(headers=headers, timeout=60)
        self._ids = itertools.count(1)

    async def __aenter__(self) -> TasksClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        params: dict[str, Any],
        *,
        tasks: bool = False,
        name: str | None = None,
        progress_token: str | None = None,
    ) -> Exchange:
        capabilities: dict[str, Any] = {"extensions": {TASKS: {}}} if tasks else {}
        meta: dict[str, Any] = {
            "io.modelcontextprotocol/protocolVersion": PROTOCOL_VERSION,
            "io.modelcontextprotocol/clientCapabilities": capabilities,
            "io.modelcontextprotocol/clientInfo": {"name": "tasks-test-client", "version": "0"},
        }
        if progress_token is not None:
            meta["progressToken"] = progress_token
        body = {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": method,
            "params": {**params, "_meta": meta},
        }
        headers = {
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": PROTOCOL_VERSION,
            "Mcp-Method": method,
        }
        if name is not None:
            headers["Mcp-Name"] = name  # the spec: tasks/* carry the task id here
        reply = await self._http.post(self.url, json=body, headers=headers)
        messages = _messages(reply)
        responses = [m for m in messages if "id" in m and m.get("id") == body["id"]]
        assert len(responses) == 1, f"HTTP {reply.status_code}: {reply.text[:500]}"
        return Exchange(body, responses[0], [m for m in messages if "id" not in m])

    async def call_tool(
        self, name: str, arguments: dict[str, Any], *, tasks: bool = True, **kwargs: Any
    ) -> Exchange:
        params = {"name": name, "arguments": arguments}
        return await self.request("tools/call", params, tasks=tasks, name=name, **kwargs)

    async def get(self, task_id: str) -> Exchange:
        return await self.request("tasks/get", {"taskId": task_id}, tasks=True, name=task_id)

    async def cancel(self, task_id: str) -> Exchange:
        return await self.request("tasks/cancel", {"taskId": task_id}, tasks=True, name=task_id)

    async def poll(self, task_id: str, *, timeout_s: float = 60.0) -> list[Exchange]:
        """`tasks/get` until the task is terminal, as often as `pollIntervalMs` says."""
        polls: list[Exchange] = []
        with anyio.fail_after(timeout_s):
            while True:
                polls.append(await self.get(task_id))
                task = polls[-1].result
                if task["status"] in ("completed", "failed", "cancelled"):
                    return polls
                await anyio.sleep(task.get("pollIntervalMs", 1000) / 1000)


def _messages(reply: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages in a JSON or an SSE response."""
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        return [
            json.loads(line.removeprefix("data:").strip())
            for line in reply.text.splitlines()
            if line.startswith("data:")
        ]
    return [reply.json()]
