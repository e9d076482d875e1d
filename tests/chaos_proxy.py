"""A small HTTP proxy in front of Prefect that fails requests on purpose.

Runs uvicorn in a thread of the test process; the test scripts the faults.
"""

import asyncio
import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mcp_frontend.devstack import free_port, wait_until


@dataclass(frozen=True)
class Fault:
    status: int
    retry_after_s: float | None = None


@dataclass
class Held:
    """A request a stalled server has read and not yet processed."""

    arrived: float  # time.monotonic()
    path: str
    gate: asyncio.Event
    done: threading.Event


class ChaosProxy:
    """Forwards to `upstream`; answers the next scripted faults instead, in order.

    `always` (when set) is answered to every request once the script is used up;
    otherwise, with probability `fault_rate`, one of `random_faults` (seeded, so a
    test's faults repeat). Requests for /health are forwarded and not counted.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.script: deque[Fault] = deque()
        self.always: Fault | None = None
        self.fault_rate = 0.0
        self.random_faults: list[Fault] = []
        self._rng = random.Random(20261124)
        self.latency_s = 0.0  # added before forwarding each request
        # A server that queues: each forwarded request waits this long per request in flight.
        self.latency_per_in_flight_s = 0.0
        self.in_flight = 0
        self.in_flight_seen: list[int] = []  # requests in flight as each one arrived
        self.faults_sent = 0
        self.forwarded = 0
        self.request_times: list[float] = []  # time.monotonic() of every request
        self.client_ports: set[int] = set()  # one per connection the clients made
        self._lock = threading.Lock()
        # A stalled server (see hold()): the requests it has read, oldest first.
        self._holding = False
        self.held: list[Held] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ChaosProxy":
        self._thread.start()
        wait_until(lambda: self._server.started, 10, "chaos proxy")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            self.request_times.append(time.monotonic())
            fault = self.script.popleft() if self.script else self.always
            if fault is None and self.random_faults and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.random_faults)
            if fault is not None:
                self.faults_sent += 1
            else:
                self.forwarded += 1
            return fault

    def hold(self) -> None:
        """Stall like a frozen server: read every request (probes too), answer none."""
        self._holding = True

    def release_newest_first(self, *, overtaken_for_s: float | None = None) -> None:
        """Wake up as a frozen server does: work through the backlog one request at a
        time, the newest first (the worst order for a client that retried), while new
        requests queue behind it; then serve as usual. Blocks until the backlog is done.

        `overtaken_for_s`: new requests are served at once instead, and the backlog only
        after that many seconds, as when one of several Prefect API processes froze.
        """
        assert self._loop is not None
        backlog, self.held = self.held, []
        if overtaken_for_s is not None:
            self._holding = False
            time.sleep(overtaken_for_s)  # the fault's duration, not a wait for a condition
        for held in reversed(backlog):
            self._loop.call_soon_threadsafe(held.gate.set)
            held.done.wait(30)
        self._holding = False
        for held in self.held:  # arrived during the backlog: in their order
            self._loop.call_soon_threadsafe(held.gate.set)
        self.held = []

    async def _handle(self, request: Request) -> Response:
        if request.client is not None:
            self.client_ports.add(request.client.port)
        if self._holding:
            return await self._held(request)
        # Workers' health probes pass untouched and uncounted: faults are for the jobs.
        probe = request.path_params["path"].endswith("/health")
        fault = None if probe else self._next_fault()
        if fault is not None:
            headers = {}
            if fault.retry_after_s is not None:
                headers["Retry-After"] = f"{fault.retry_after_s:g}"
            return Response(b'{"detail":"injected fault"}', fault.status, headers=headers)
        self.in_flight += 1  # one event loop: no lock needed
        try:
            self.in_flight_seen.append(self.in_flight)
            delay_s = self.latency_s + self.latency_per_in_flight_s * self.in_flight
            if delay_s:
                await asyncio.sleep(delay_s)
            return await self._forward(request, await request.body())
        finally:
            self.in_flight -= 1

    async def _held(self, request: Request) -> Response:
        """Keep a request until released, then forward it even if its caller has gone,
        as a server woken from SIGSTOP processes what it had read."""
        self._loop = asyncio.get_running_loop()
        body = await request.body()
        held = Held(time.monotonic(), request.url.path, asyncio.Event(), threading.Event())
        self.held.append(held)
        await held.gate.wait()
        try:
            return await self._forward(request, body)
        finally:
            held.done.set()

    async def _forward(self, request: Request, body: bytes) -> Response:
        async with httpx.AsyncClient() as client:
            upstream = await client.request(
                request.method,
                f"{self.upstream}/{request.path_params['path']}",
                params=request.query_params,
                content=body,
                headers={"content-type": request.headers.get("content-type", "application/json")},
            )
        return Response(
            upstream.content,
            upstream.status_code,
            media_type=upstream.headers.get("content-type"),
        )


class BlackHole:
    """A listener that never accepts: a Prefect behind a firewall that drops packets.

    Its accept queue is filled at once, so the kernel drops every further SYN and a
    client's connect hangs until its own timeout, as it would for an unreachable host.
    """

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._fillers: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "BlackHole":
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self._fillers.append(filler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in [*self._fillers, self._listener]:
            sock.close()
