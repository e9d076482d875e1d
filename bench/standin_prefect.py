"""A stand-in for Prefect's set_state endpoint that ACCEPTs every change at once (B6).

Bench-only: it shows what the queue itself can apply when Prefect costs nothing.
It answers what a worker calls: `POST /api/{task,flow}_runs/<id>/set_state`
(ACCEPT, echoing the state asked for), the state histories (empty: nothing
was written before) and `/api/health`. Raw ASGI on uvicorn, so that its own
CPU per call is small beside the worker's.

    python bench/standin_prefect.py --port 4300 [--service-ms 8]

`--service-ms` models a one-process Prefect without its CPU: set_state calls are
served one at a time, each taking that long (asleep), so the queue drains at a
Prefect-like rate and its own CPU per change can be read at that rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
SERVICE_S = 0.0  # set by --service-ms
_one_at_a_time = asyncio.Lock()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path: str = scope["path"]
    if scope["method"] == "POST" and path.endswith("/set_state"):
        state = json.loads(body)["state"]
        if SERVICE_S:
            async with _one_at_a_time:
                await asyncio.sleep(SERVICE_S)
        answer: Any = {
            "status": "ACCEPT",
            "state": {"type": state["type"], "name": state.get("name")},
            "details": {},
        }
    elif path.endswith("_run_states/") or path.endswith("_run_states"):
        answer = []
    elif path.endswith("/health"):
        answer = True
    else:
        await _reply(send, 404, {"detail": "not in the stand-in"})
        return
    await _reply(send, 200, answer)


async def _reply(send: Send, status: int, answer: Any) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service-ms", type=float, default=0.0)
    args = parser.parse_args()
    global SERVICE_S
    SERVICE_S = args.service_ms / 1000
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
