"""Agents: MCP clients that submit their changes through the published frontends.

Each agent owns some runs and submits their changes in order, as a random mix
of single calls and batches, every change with an idempotency key. A call that
fails (a tool error saying a resend is safe, a dropped connection, a timeout)
is sent again, unchanged, to the other frontend: the key makes that safe, and
since an agent moves on only once it holds a ticket, each run's order is kept.
Everything an agent saw is kept for the checks and the report.
"""

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

# A tool call longer than this is given up and sent elsewhere: the frontend's own
# Redis timeout (5 s) plus the durability wait (2 s) plus room for a loaded machine.
CALL_TIMEOUT_S = 12.0
# A frontend that failed a call is left alone this long before the agent tries it again.
AVOID_S = 5.0
# The pause before a resend: a failover or a reconnect takes seconds, not milliseconds.
RESEND_PAUSE_S = 0.5
# Longer than any fault of the suite: a change no frontend stores in this long fails the test.
GIVE_UP_S = 120.0
# Tool errors after which the frontend says a resend is safe (or nothing was stored).
RESENDABLE = ("may or may not be stored", "unavailable", "retry later")


@dataclass
class Call:
    """One tool call: where it went, when, and what came back."""

    url: str
    started: float  # time.time()
    ended: float
    tickets: int  # 0 when it failed
    error: str = ""


@dataclass
class Agent:
    """One MCP client with a preferred frontend and the other ones to fall back on."""

    name: str
    token: str
    urls: list[str]  # the preferred frontend first
    seed: int
    pace_s: float = 0.0  # at least this long between the starts of two calls
    calls: list[Call] = field(default_factory=list)
    tickets: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    deduplicated: int = 0  # tickets for a change an earlier, failed call had stored
    in_flight: str | None = None  # the frontend a call is waiting on now
    _avoid_until: dict[str, float] = field(default_factory=dict)
    finished: bool = False  # every change ticketed

    async def submit(self, changes: list[dict[str, Any]]) -> None:
        """Submit every change in order, each until some frontend gives a ticket for it."""
        rng = random.Random(self.seed)
        index = 0
        next_start = time.monotonic()
        try:
            while index < len(changes):
                # A steady load across the fault rather than one burst before it.
                await asyncio.sleep(max(0.0, next_start - time.monotonic()))
                next_start = time.monotonic() + self.pace_s
                if rng.random() < 0.5:
                    batch = changes[index : index + 1]
                    tool, args = _single_call(batch[0])
                else:
                    batch = changes[index : index + rng.randint(2, 25)]
                    tool, args = "submit_state_changes", {"changes": batch}
                result = await self._until_stored(tool, args)
                tickets = result["jobs"] if tool == "submit_state_changes" else [result]
                assert len(tickets) == len(batch), (tool, len(batch), result)
                for change, ticket in zip(batch, tickets, strict=True):
                    key = change["idempotency_key"]
                    assert key not in self.tickets, f"{self.name}: {key} submitted twice"
                    self.tickets[key] = ticket["job_id"]
                    self.deduplicated += bool(ticket["deduplicated"])
                index += len(batch)
            self.finished = True
        finally:
            self.in_flight = None

    def failed_calls(self) -> list[Call]:
        return [call for call in self.calls if not call.tickets]

    async def _until_stored(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + GIVE_UP_S
        while True:
            url = self._pick_url()
            started = time.time()
            self.in_flight = url
            try:
                result, error = await self._call(url, tool, args)
            finally:
                self.in_flight = None
            tickets = 0 if result is None else len(result.get("jobs", [result]))
            self.calls.append(Call(url, started, time.time(), tickets, error))
            if result is not None:
                return result
            assert any(text in error for text in RESENDABLE) or error.startswith("transport"), (
                f"{self.name}: {tool} failed for good at {url}: {error}"
            )
            assert time.monotonic() < deadline, (
                f"{self.name}: no frontend stored a change in {GIVE_UP_S:g} s; last: {error}"
            )
            self._avoid_until[url] = time.monotonic() + AVOID_S
            await asyncio.sleep(RESEND_PAUSE_S)

    async def _call(
        self, url: str, tool: str, args: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, str]:
        """The structured result, or None and why not.

        Each call has a client of its own, in a task of its own: a connection the
        fault broke can then take nothing down with it but that call (the SDK's task
        groups cancel the task they run in when their connection fails).
        """
        call = asyncio.create_task(_call_once(self.token, url, tool, args))
        try:
            await asyncio.wait({call}, timeout=CALL_TIMEOUT_S * 2)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if not call.done():
            call.cancel()
            await asyncio.wait({call})
            return None, "transport: no answer in time"
        if call.cancelled():
            return None, "transport: cancelled by its connection"
        error = call.exception()
        if error is not None:
            return None, f"transport: {_innermost(error)}"[:300]
        return call.result()

    def _pick_url(self) -> str:
        """The preferred frontend unless it failed lately; else the one that failed longest ago."""
        now = time.monotonic()
        for url in self.urls:
            if self._avoid_until.get(url, 0.0) <= now:
                return url
        return min(self.urls, key=lambda url: self._avoid_until[url])


async def _call_once(
    token: str, url: str, tool: str, args: dict[str, Any]
) -> tuple[dict[str, Any] | None, str]:
    result = None
    try:
        async with (
            httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {token}"},
                timeout=httpx2.Timeout(CALL_TIMEOUT_S),
            ) as http,
            # No DELETE on close: after a failure the frontend may be out of reach.
            Client(
                streamable_http_client(url, http_client=http, terminate_on_close=False),
                read_timeout_seconds=CALL_TIMEOUT_S,
            ) as client,
        ):
            result = await client.call_tool(tool, args)
    except Exception:
        if result is None:
            raise
        # The answer came and closing failed: the answer stands.
    assert result is not None
    if result.is_error:
        return None, " ".join(getattr(c, "text", "") for c in result.content)[:500]
    assert result.structured_content is not None
    return dict(result.structured_content), ""


def _innermost(error: BaseException) -> str:
    """What failed, out of the SDK's task-group wrappers: `ConnectError: ...`."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


def _single_call(change: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    field_name = f"{change['run_type']}_run_id"
    args = {k: v for k, v in change.items() if k not in ("run_type", "run_id")}
    return f"set_{change['run_type']}_run_state", {field_name: change["run_id"], **args}


async def run_agents(agents: list[Agent], plans: list[list[dict[str, Any]]]) -> None:
    """All agents at once; the first agent's failure is raised."""
    async with asyncio.TaskGroup() as group:
        for agent, plan in zip(agents, plans, strict=True):
            group.create_task(agent.submit(plan))
    # A task group takes a cancelled task for a finished one: say so.
    unfinished = [agent.name for agent in agents if not agent.finished]
    assert not unfinished, f"agents stopped before their last change: {unfinished}"
