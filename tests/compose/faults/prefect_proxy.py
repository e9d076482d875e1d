"""A proxy between the workers and Prefect, in its own container, faults set over HTTP.

Runs as a script in the app image (it needs only starlette, uvicorn and httpx):
the workers' PREFECT_API_URL points at port 4200, and the test sets the mode on
port 4201 (published on 127.0.0.1):

    POST /mode {"mode": "pass", "latency_s": [0.3, 0.5]}  forward, each call delayed
    POST /mode {"mode": "hole"}    read every request, answer none; when the mode
                                   changes, forward only those whose caller still waits
    POST /mode {"mode": "flap", "fail_rate": 0.5}   HTTP 500 to that share of calls
    GET /stats                     the mode and what the proxy did so far
"""

import asyncio
import json
import os
import random
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

UPSTREAM = os.environ.get("UPSTREAM", "http://prefect-server:4200").rstrip("/")
MODES = ("pass", "hole", "flap")


class Proxy:
    """The mode and counters, shared by the two servers of one event loop."""

    def __init__(self) -> None:
        self.mode = "pass"
        self.latency_s = (0.0, 0.0)
        self.fail_rate = 0.0
        self.mode_changed = asyncio.Event()
        self.counts = dict.fromkeys(
            ("forwarded", "failed_500", "held", "held_forwarded", "held_dropped", "in_flight"), 0
        )
        self.rng = random.Random(20261201)
        self.http = httpx.AsyncClient(timeout=60)

    def set_mode(self, body: dict[str, Any]) -> None:
        mode = body.get("mode", "pass")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        low, high = body.get("latency_s", (0.0, 0.0))
        self.mode, self.latency_s = mode, (float(low), float(high))
        self.fail_rate = float(body.get("fail_rate", 0.0))
        self.mode_changed.set()
        self.mode_changed = asyncio.Event()

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        if self.mode == "hole" and not await self._held(request):
            self.counts["held_dropped"] += 1
            return Response(b"", 502)  # its caller hung up long ago: nobody reads this
        if self.mode == "flap" and self.rng.random() < self.fail_rate:
            self.counts["failed_500"] += 1
            return JSONResponse({"detail": "injected fault"}, 500)
        low, high = self.latency_s
        self.counts["in_flight"] += 1
        try:
            if high > 0:
                await asyncio.sleep(self.rng.uniform(low, high))
            upstream = await self.http.request(
                request.method,
                f"{UPSTREAM}{request.url.path}",
                params=request.query_params,
                content=body,
                headers={"content-type": request.headers.get("content-type", "application/json")},
            )
        except httpx.HTTPError as e:  # Prefect down or starting: what a real proxy answers
            return JSONResponse({"detail": f"upstream: {type(e).__name__}"}, 502)
        finally:
            self.counts["in_flight"] -= 1
        self.counts["forwarded"] += 1
        return Response(
            upstream.content, upstream.status_code, media_type=upstream.headers.get("content-type")
        )

    async def _held(self, request: Request) -> bool:
        """Hold a request through the black hole; whether its caller still waits after it."""
        self.counts["held"] += 1
        while self.mode == "hole":
            changed = self.mode_changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=1.0)
            except TimeoutError:
                continue
        if await request.is_disconnected():
            return False
        self.counts["held_forwarded"] += 1
        return True


async def main() -> None:
    proxy = Proxy()

    async def mode(request: Request) -> Response:
        try:
            proxy.set_mode(json.loads(await request.body() or b"{}"))
        except (ValueError, TypeError) as e:
            return JSONResponse({"error": str(e)}, 400)
        return await stats(request)

    async def stats(request: Request) -> Response:
        return JSONResponse(
            {
                "mode": proxy.mode,
                "latency_s": proxy.latency_s,
                "fail_rate": proxy.fail_rate,
                **proxy.counts,
            }
        )

    forward = Starlette(
        routes=[Route("/{path:path}", proxy.handle, methods=["GET", "POST", "PATCH", "DELETE"])]
    )
    control = Starlette(
        routes=[Route("/mode", mode, methods=["POST"]), Route("/stats", stats, methods=["GET"])]
    )
    servers = [
        uvicorn.Server(uvicorn.Config(app, host="0.0.0.0", port=port, log_level="warning"))
        for app, port in ((forward, 4200), (control, 4201))
    ]
    await asyncio.gather(*(server.serve() for server in servers))


if __name__ == "__main__":
    asyncio.run(main())
