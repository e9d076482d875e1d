"""A small MCP client that speaks the tasks extension over streamable HTTP.

It sends the 2026-07-28 per-request envelope by hand, so that tests see (and
can validate) every message on the wire. No published Python client drives
`io.modelcontextprotocol/tasks` yet; the SDK 2.3 client only parses foreign
result shapes through an extension the caller writes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator
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


class ListenStream:
    """A `subscriptions/listen` response, read one message at a time as the server sends it."""

    def __init__(self, request: dict[str, Any], reply: httpx.Response) -> None:
        self.request = request
        self.reply = reply
        self._messages = _streamed_messages(reply)

    @property
    def is_event_stream(self) -> bool:
        content_type: str = self.reply.headers.get("content-type", "")
        return content_type.startswith("text/event-stream")

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._messages

    async def next(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """The next message; fails if none comes within `timeout_s` or the stream ends."""
        with anyio.fail_after(timeout_s):
            try:
                return await anext(self._messages)
            except StopAsyncIteration:
                raise AssertionError("the listen stream ended") from None

    async def until_closed(self, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Every message up to and including the listen's own response, which ends the stream."""
        received: list[dict[str, Any]] = []
        with anyio.fail_after(timeout_s):
            async for message in self._messages:
                received.append(message)
                if message.get("id") == self.request["id"]:
                    return received
        raise AssertionError(f"the stream ended without a response: {received}")


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
        body = self._body(method, params, tasks=tasks, progress_token=progress_token)
        headers = _headers(method, name)
        reply = await self._http.post(self.url, json=body, headers=headers)
        messages = _messages(reply)
        responses = [m for m in messages if "id" in m and m.get("id") == body["id"]]
        assert len(responses) == 1, f"HTTP {reply.status_code}: {reply.text[:500]}"
        return Exchange(body, responses[0], [m for m in messages if "id" not in m])

    @contextlib.asynccontextmanager
    async def listen(
        self, task_ids: list[str] | None, *, tasks: bool = True, **notifications: Any
    ) -> AsyncIterator[ListenStream]:
        """`subscriptions/listen` for `task_ids` (None: no `taskIds` key) plus any other filter
        keys, read as it streams.

        Leaving the block closes the connection: a listen the client abandons.
        """
        if task_ids is not None:
            notifications["taskIds"] = task_ids
        params = {"notifications": notifications}
        body = self._body("subscriptions/listen", params, tasks=tasks)
        headers = _headers("subscriptions/listen", None)
        async with self._http.stream("POST", self.url, json=body, headers=headers) as reply:
            # Held here while the block runs: a stream nobody refers to any more would be
            # collected, and its reader's clean-up would close the connection.
            stream = ListenStream(body, reply)
            yield stream

    def _body(
        self,
        method: str,
        params: dict[str, Any],
        *,
        tasks: bool,
        progress_token: str | None = None,
    ) -> dict[str, Any]:
        capabilities: dict[str, Any] = {"extensions": {TASKS: {}}} if tasks else {}
        meta: dict[str, Any] = {
            "io.modelcontextprotocol/protocolVersion": PROTOCOL_VERSION,
            "io.modelcontextprotocol/clientCapabilities": capabilities,
            "io.modelcontextprotocol/clientInfo": {"name": "tasks-test-client", "version": "0"},
        }
        if progress_token is not None:
            meta["progressToken"] = progress_token
        return {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": method,
            "params": {**params, "_meta": meta},
        }

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


def _headers(method: str, name: str | None) -> dict[str, str]:
    headers = {
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": PROTOCOL_VERSION,
        "Mcp-Method": method,
    }
    if name is not None:
        headers["Mcp-Name"] = name  # the spec: tasks/* carry the task id here
    return headers


async def _streamed_messages(reply: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON-RPC messages of a JSON or an SSE response, each as soon as it has arrived."""
    if not reply.headers.get("content-type", "").startswith("text/event-stream"):
        await reply.aread()
        yield reply.json()
        return
    data: list[str] = []
    async for line in reply.aiter_lines():
        if line.startswith("data:"):
            data.append(line.removeprefix("data:").removeprefix(" "))
        elif not line and data:  # a blank line ends an event
            yield json.loads("\n".join(data))
            data = []
    if data:
        yield json.loads("\n".join(data))


def _messages(reply: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages in a JSON or an SSE response."""
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        return [
            json.loads(line.removeprefix("data:").strip())
            for line in reply.text.splitlines()
            if line.startswith("data:")
        ]
    return [reply.json()]


@dataclass
class Frontends:
    """Three `pmq serve` replicas on one stack: two open, one behind tokens."""

    url: str
    replica_url: str
    secured_url: str

    @classmethod
    def start(cls, stack: Any, tokens: str) -> Frontends:
        """On `stack` (a tests.conftest.Stack); `tokens` as PMQ_AUTH_TOKENS for the third."""
        _, first = stack.start_frontend()
        _, second = stack.start_frontend()
        _, secured = stack.start_frontend(auth_tokens=tokens)
        return cls(*(f"http://127.0.0.1:{port}/mcp" for port in (first, second, secured)))
