"""The streamable HTTP app: the MCP endpoint at /mcp plus /healthz."""

import ipaddress

from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse


class UnsafeBind(ValueError):
    """Serving beyond loopback without authentication."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_http_app(mcp: MCPServer, *, host: str) -> Starlette:
    """The ASGI app for `pmq serve --transport http`.

    Stateless: any frontend replica can answer any request, since every job
    lives in Redis. DNS-rebinding protection stays on (the SDK's default for a
    loopback bind).
    """
    if not is_loopback(host):
        # Bearer-token auth arrives with issue #4; until then only loopback is served.
        raise UnsafeBind(
            f"refusing to serve on {host}: only loopback addresses are allowed until "
            "token authentication is configured"
        )

    app = mcp.streamable_http_app(stateless_http=True, json_response=True, host=host)
    app.add_route("/healthz", healthz, methods=["GET"])
    return app


async def healthz(_: Request) -> JSONResponse:
    """Liveness: the process answers. Readiness checks arrive with issue #4."""
    return JSONResponse({"status": "ok"})
