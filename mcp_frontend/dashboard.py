"""/dashboard: the fleet's live view in a browser, for operator tokens only.

The page, its script and its stylesheet are files in `dashboard_static/`,
served as they are: no build step, and nothing loaded from anywhere but this
frontend (the page's Content-Security-Policy enforces it). The script polls
/dashboard/api/snapshot and works out the rates from successive snapshots.

It is an operator's view: every client's jobs, not only the caller's.
"""

import base64
import binascii
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mcp.server.auth.provider import AccessToken
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from mcp_frontend.auth import Auth, Forbidden, Right, caller_of
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
    """Admits a request whose token has the dashboard right; with no auth, every request.

    The token may come as a bearer token (scripts) or as the password of HTTP
    Basic with any user name, which a browser asks its user for on a 401.
    Another role's valid token gets 403: the dashboard shows every client's jobs.
    """

    def __init__(self, auth: Auth) -> None:
        self._verifier = auth.verifier() if auth.enabled else None

    async def refusal(self, request: Request) -> Response | None:
        """None to admit the request, else the answer that refuses it."""
        if self._verifier is None:
            return None
        token = presented_token(request.headers.get("authorization", ""))
        verified = await self._verifier.verify_token(token) if token else None
        if verified is None or _expired(verified):
            return Response(
                "a token is needed: the password of HTTP Basic, or a bearer token\n",
                status_code=401,
                headers={"WWW-Authenticate": CHALLENGE, "Cache-Control": "no-store"},
            )
        caller = caller_of(verified)
        if not caller.may(Right.DASHBOARD):
            message = Forbidden(caller, Right.DASHBOARD, "the dashboard")
            return Response(f"{message}\n", status_code=403, headers={"Cache-Control": "no-store"})
        return None


def _expired(token: AccessToken) -> bool:
    # The SDK's bearer middleware refuses these for /mcp; the same rule here.
    return token.expires_at is not None and token.expires_at < time.time()


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
        auth: Auth,
        security: TransportSecuritySettings | None,
        worker_max_age_s: float,
    ) -> None:
        self.service = service
        self.gate = TokenGate(auth)
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
            refused = await self.gate.refusal(request)
            if refused is not None:
                return refused
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
