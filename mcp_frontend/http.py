"""The streamable HTTP app: the MCP endpoint at /mcp, /healthz and /dashboard."""

import ipaddress

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from mcp_frontend.auth import Auth
from mcp_frontend.dashboard import Dashboard
from mcp_frontend.health import FleetProbe
from mcp_frontend.jobs import JobService, job_store
from mcp_frontend.waiters import TerminalWaiters
from worker.redis_conn import redis_client
from worker.settings import Settings

LOOPBACK_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
# The binds on which the MCP SDK turns its DNS-rebinding check on by itself.
SDK_LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1")


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


def check_public_url(host: str, auth: Auth, public_url: str | None) -> None:
    """With JWTs the OAuth metadata names this server: beyond loopback, only the
    operator knows the URL its clients use (a bind address like 0.0.0.0 is not one)."""
    if auth.jwt is not None and not public_url and not is_loopback(host):
        raise UnsafeBind(
            f"PMQ_PUBLIC_URL is needed with PMQ_JWT_JWKS_URL on {host}: the OAuth metadata "
            "names the server by the URL its clients use"
        )


def build_http_app(
    mcp: MCPServer,
    settings: Settings,
    *,
    host: str,
    allowed_hosts: list[str],
    auth: Auth,
) -> Starlette:
    """The ASGI app for `pmq serve --transport http`.

    Stateless: any frontend replica can answer any request, since every job
    lives in Redis. /healthz, /readyz and /metrics need no token; /dashboard
    needs an operator's token when `auth` is enabled.
    """
    security = None
    if allowed_hosts:
        security = TransportSecuritySettings(allowed_hosts=[*allowed_hosts, *LOOPBACK_HOSTS])
    app = mcp.streamable_http_app(
        stateless_http=True, json_response=False, host=host, transport_security=security
    )
    # Connections open on first use, inside the server's event loop.
    redis = redis_client(settings)
    worker_max_age_s = 3 * settings.heartbeat_s
    probe = FleetProbe(redis, worker_max_age_s=worker_max_age_s)
    app.add_route("/healthz", healthz, methods=["GET"])
    app.add_route("/readyz", probe.readyz, methods=["GET"])
    app.add_route("/metrics", probe.metrics, methods=["GET"])
    dashboard = Dashboard(
        _reader(redis, settings),
        auth=auth,
        security=_dashboard_security(host, security),
        worker_max_age_s=worker_max_age_s,
    )
    app.router.routes.extend(dashboard.routes())
    return app


def _reader(redis: Redis, settings: Settings) -> JobService:
    """A JobService that only reads: the dashboard never submits or long-polls,
    so its waiters never subscribe."""
    return JobService(
        job_store(redis, settings), TerminalWaiters(redis), max_wait_s=settings.max_wait_s
    )


def _dashboard_security(
    host: str, security: TransportSecuritySettings | None
) -> TransportSecuritySettings | None:
    """The Host check the SDK gives /mcp: the configured one; with none, loopback's
    on the binds where the SDK turns it on by itself."""
    if security is None and host in SDK_LOOPBACK_BINDS:
        origins = [f"http://{pattern}" for pattern in LOOPBACK_HOSTS]
        return TransportSecuritySettings(allowed_hosts=LOOPBACK_HOSTS, allowed_origins=origins)
    return security


async def healthz(_: Request) -> JSONResponse:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})
