"""The streamable HTTP app: the MCP endpoint at /mcp plus /healthz."""

import ipaddress

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from mcp_frontend.health import FleetProbe
from worker.redis_conn import redis_client
from worker.settings import Settings

LOOPBACK_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*"]


class UnsafeBind(ValueError):
    """Serving beyond loopback without authentication."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, has_tokens: bool, allow_open: bool) -> None:
    """Refuse to serve other machines without tokens unless told to run open."""
    if not is_loopback(host) and not has_tokens and not allow_open:
        raise UnsafeBind(
            f"refusing to serve on {host} without authentication: set PMQ_AUTH_TOKENS or "
            "PMQ_AUTH_TOKENS_FILE (or PMQ_ALLOW_OPEN=true to run open anyway)"
        )


def build_http_app(
    mcp: MCPServer, settings: Settings, *, host: str, allowed_hosts: list[str]
) -> Starlette:
    """The ASGI app for `pmq serve --transport http`.

    Stateless: any frontend replica can answer any request, since every job
    lives in Redis. /healthz, /readyz and /metrics need no token.
    """
    security = None
    if allowed_hosts:
        security = TransportSecuritySettings(allowed_hosts=[*allowed_hosts, *LOOPBACK_HOSTS])
    app = mcp.streamable_http_app(
        stateless_http=True, json_response=False, host=host, transport_security=security
    )
    probe = FleetProbe(redis_client(settings), worker_max_age_s=3 * settings.heartbeat_s)
    app.add_route("/healthz", healthz, methods=["GET"])
    app.add_route("/readyz", probe.readyz, methods=["GET"])
    app.add_route("/metrics", probe.metrics, methods=["GET"])
    return app


async def healthz(_: Request) -> JSONResponse:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})
