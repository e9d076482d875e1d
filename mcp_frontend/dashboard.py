"""/dashboard: the fleet's live view in a browser, behind the frontend's tokens.

The page, its script and its stylesheet are files in `dashboard_static/`,
served as they are: no build step, and nothing loaded from anywhere but this
frontend (the page's Content-Security-Policy enforces it). The script polls
/dashboard/api/snapshot and works out the rates from successive snapshots.

It is an operator's view: every client's jobs, not only the caller's.
"""

import base64
import binascii
from collections.abc import Awaitable, Callable
from pathlib import Path

from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from mcp_frontend.auth import StaticTokenVerifier
from mcp_frontend.fleet_view import snapshot
from mcp_frontend.jobs import JobService

STATIC_DIR = Path(__file__).parent / "dashboard_static"
# Served by name only, so no request path ever reaches the filesystem.
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
CHALLENGE = 'Basic realm="prefect-mcp-queue", charset="UTF-8"'
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
Handler = Callable[[Request], Awaitable[Response]]


class TokenGate:
    """Admits a request that carries a configured token; with no tokens, every request.

    The token may come as a bearer token (scripts) or as the password of HTTP
    Basic with any user name, which a browser asks its user for on a 401.
    """

    def __init__(self, tokens: dict[str, str]) -> None:
        self._verifier = StaticTokenVerifier(tokens) if tokens else None

    async def admits(self, request: Request) -> bool:
        if self._verifier is None:
            return True
        token = presented_token(request.headers.get("authorization", ""))
        return token is not None and await self._verifier.verify_token(token) is not None


def presented_token(authorization: str) -> str | None:
    """The token in an Authorization header: a bearer token or a Basic password."""
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials or None
    if scheme.lower() != "basic":
        return None
    try:
        user_pass = base64.b64decode(credentials, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = user_pass.partition(":")
    return password if colon and password else None


class Dashboard:
    """The page, its assets and the snapshot API, each behind the same checks."""

    def __init__(
        self,
        service: JobService,
        *,
        tokens: dict[str, str],
        security: TransportSecuritySettings | None,
        worker_max_age_s: float,
    ) -> None:
        self.service = service
        self.gate = TokenGate(tokens)
        # The MCP endpoint's Host check, so an open loopback dashboard cannot be
        # read by another site through DNS rebinding.
        self.hosts = TransportSecurityMiddleware(security)
        self.worker_max_age_s = worker_max_age_s

    def routes(self) -> list[Route]:
        return [
            Route("/dashboard", self._guarded(self.page), methods=["GET"]),
            Route("/dashboard/api/snapshot", self._guarded(self.snapshot), methods=["GET"]),
            Route("/dashboard/static/{name}", self._guarded(self.asset), methods=["GET"]),
        ]

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            refused = await self.hosts.validate_request(request)
            if refused is not None:
                return refused
            if not await self.gate.admits(request):
                return Response(
                    "a token is needed: the password of HTTP Basic, or a bearer token\n",
                    status_code=401,
                    headers={"WWW-Authenticate": CHALLENGE, "Cache-Control": "no-store"},
                )
            return await handler(request)

        return guarded

    async def page(self, _: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return Response("not found\n", status_code=404)
        return FileResponse(
            STATIC_DIR / name,
            media_type=ASSETS[name],
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def snapshot(self, _: Request) -> Response:
        no_store = {"Cache-Control": "no-store"}
        try:
            fleet = await snapshot(self.service, worker_max_age_s=self.worker_max_age_s)
        except RedisError:
            return JSONResponse({"error": "redis unreachable"}, status_code=503, headers=no_store)
        return JSONResponse(fleet.model_dump(mode="json"), headers=no_store)
