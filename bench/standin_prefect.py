"""A stand-in for Prefect's set_state endpoint that ACCEPTs every change at once (B6).

Bench-only: it shows what the queue itself can apply when Prefect costs nothing.
It answers what a worker calls: `POST /api/{task,flow}_runs/<id>/set_state`
(ACCEPT, echoing the state asked for), the state histories (empty: nothing
was written before) and `/api/health`. Raw ASGI on uvicorn, so that its own
CPU per call is small beside the worker's.

    python bench/standin_prefect.py --port 4300
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]


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
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
