"""`pmq`: serve the MCP frontend, run a worker, or run the whole stack locally.

The MCP SDK, uvicorn and Prefect are imported by the commands that use them,
so that `pmq jobs` and `pmq health` (run by scripts and container health
checks, often) start in about a second.
"""

from __future__ import annotations

import asyncio
import enum
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import httpx
import typer
from redis.exceptions import RedisError

from mcp_frontend.devstack import StartupError, client_config, dev_stack
from mcp_frontend.jobs_cli import jobs
from mcp_frontend.logs import configure_logging
from mcp_frontend.privileges import RunAsError, drop_privileges
from worker.redis_conn import close_redis, redis_client
from worker.settings import Settings

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from mcp_frontend.auth import Auth

app = typer.Typer(
    help="prefect-mcp-queue: queue Prefect state changes for fleets of agents.",
    no_args_is_help=True,
)


@app.callback()
def _leave_root(ctx: typer.Context) -> None:
    """Every command but `serve` (which first reads its tokens) leaves root at once."""
    if ctx.invoked_subcommand != "serve":
        _drop_privileges(Settings())


def _drop_privileges(settings: Settings) -> None:
    try:
        drop_privileges(settings.run_as)
    except (RunAsError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


health = typer.Typer(help="Health checks for container orchestrators: exit 0 when healthy.")
app.add_typer(health, name="health")
app.add_typer(jobs, name="jobs")
token = typer.Typer(help="Bearer tokens for the HTTP frontend's tokens file.")
app.add_typer(token, name="token")


class RoleName(enum.StrEnum):
    agent = "agent"
    reader = "reader"
    operator = "operator"


@token.command("new")
def token_new(
    client: Annotated[str, typer.Option(help="The client id the token acts as.")],
    role: Annotated[RoleName, typer.Option(help="What the token may do.")] = RoleName.agent,
) -> None:
    """Print a fresh random token once, and the line for the tokens file.

    The line holds a salted digest, not the token: the file never holds the secret.
    """
    from mcp_frontend.auth import Role, TokenConfigError, new_token

    try:
        made = new_token(client, Role(role.value))
    except TokenConfigError as exc:
        typer.echo(f"error: --client: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"token (shown once; give it to {client}): {made.token}")
    typer.echo(f"line for PMQ_AUTH_TOKENS_FILE: {made.line}")


class Transport(enum.StrEnum):
    stdio = "stdio"
    http = "http"


def _logging(settings: Settings, auth: Auth | None = None) -> None:
    configure_logging(
        json_lines=settings.log_format == "json",
        level=settings.log_level,
        secrets=[*settings.secrets(), *(auth.secrets() if auth else [])],
    )


@app.command()
def serve(
    transport: Annotated[
        Transport, typer.Option(help="stdio for desktop clients, http for others.")
    ] = Transport.stdio,
    host: Annotated[str | None, typer.Option(help="HTTP bind address [PMQ_HTTP_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [PMQ_HTTP_PORT].")] = None,
    processes: Annotated[
        int | None,
        typer.Option(help="HTTP server processes on the one port [PMQ_HTTP_PROCESSES].", min=1),
    ] = None,
) -> None:
    """Run the MCP frontend."""
    import uvicorn

    from mcp_frontend.auth import TokenConfigError, load_auth
    from mcp_frontend.http import UnsafeBind, check_bind, check_public_url
    from mcp_frontend.server import build_server

    settings = Settings()
    _stop_if_redis_unusable(settings)
    if transport is Transport.stdio:
        _drop_privileges(settings)
        _logging(settings)
        build_server(settings).run("stdio")  # the local user owns stdio: no tokens
        return
    bind_host = host or settings.http_host
    bind_port = port or settings.http_port
    try:
        auth = load_auth(settings)
        check_bind(bind_host, has_tokens=auth.enabled, allow_open=settings.allow_open)
        check_public_url(bind_host, auth, settings.public_url)
    except (TokenConfigError, UnsafeBind, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _logging(settings, auth)
    count = processes or settings.http_processes
    if count == 1:
        _drop_privileges(settings)  # the tokens file may be readable by root only
        asgi = _http_app(settings, auth, bind_host, bind_port)
        # log_config=None: uvicorn keeps our handler (JSON, secrets scrubbed).
        uvicorn.run(asgi, host=bind_host, port=bind_port, log_config=None, access_log=False)
        return
    # Several processes accept on one socket and the kernel spreads connections;
    # each child builds its app from the same environment (see http_app_factory),
    # so the command line's address reaches them there. The parent only supervises;
    # each child reads its tokens, then leaves root itself.
    os.environ["PMQ_HTTP_HOST"], os.environ["PMQ_HTTP_PORT"] = bind_host, str(bind_port)
    uvicorn.run(
        "mcp_frontend.cli:http_app_factory",
        factory=True,
        workers=count,
        host=bind_host,
        port=bind_port,
        log_config=None,
        access_log=False,
    )


def _stop_if_redis_unusable(settings: Settings) -> None:
    """Exit 2 at once on a Redis that can never work (a wrong CA, say); serve one
    that is only down: /readyz says so, and the tools answer once it is back."""
    from worker.redis_check import RedisUnusable, check_redis

    try:
        asyncio.run(check_redis(settings))
    except RedisUnusable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except RedisError:
        pass


def _http_app(settings: Settings, auth: Auth, host: str, port: int) -> Starlette:
    from mcp_frontend.http import build_http_app
    from mcp_frontend.server import build_server

    public_url = settings.public_url or f"http://{host}:{port}"
    mcp = build_server(settings, auth=auth, public_url=public_url)
    allowed = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
    return build_http_app(mcp, settings, host=host, allowed_hosts=allowed, auth=auth)


def http_app_factory() -> Starlette:
    """The HTTP app of one process of `pmq serve --processes N` (checked by the parent)."""
    from mcp_frontend.auth import load_auth

    settings = Settings()
    auth = load_auth(settings)
    _drop_privileges(settings)
    _logging(settings, auth)
    return _http_app(settings, auth, settings.http_host, settings.http_port)


@app.command()
def worker() -> None:
    """Run an arq worker that applies queued changes to Prefect."""
    from worker.app import run_worker  # Prefect is imported only by the commands that need it

    settings = Settings()
    _logging(settings)  # after importing Prefect, which sets up logging of its own
    run_worker(settings)


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="Port of the MCP HTTP endpoint.")] = 8000,
    state_dir: Annotated[
        Path, typer.Option(help="Where Redis and Prefect keep their data.")
    ] = Path(".pmq-dev"),
) -> None:
    """Run Redis, a Prefect server, a worker and the HTTP frontend on this machine."""
    settings = Settings()
    # Use what the caller already runs; start the rest.
    redis_url = settings.redis_url if "redis_url" in settings.model_fields_set else None
    try:
        with dev_stack(
            state_dir.resolve(),
            http_port=port,
            redis_url=redis_url,
            prefect_api_url=settings.prefect_api_url,
        ) as (url, env):
            typer.echo(
                f"\nprefect-mcp-queue is up.\n  MCP endpoint: {url}\n"
                f"  Prefect API:  {env['PREFECT_API_URL']}\n"
                f"  Redis:        {env['PMQ_REDIS_URL']}\n  logs:         {state_dir}/\n"
            )
            typer.echo("MCP client configuration:\n" + client_config(url, env))
            typer.echo("\nCtrl-C stops everything.")
            try:
                signal_wait()
            except KeyboardInterrupt:
                typer.echo("\nstopping ...")
    except StartupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def signal_wait() -> None:
    """Block until SIGINT or SIGTERM (both raise KeyboardInterrupt here)."""
    import signal

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    while True:
        signal.pause()


@health.command("worker")
def health_worker() -> None:
    """Healthy when a worker on this host has a fresh heartbeat in Redis."""
    from mcp_frontend.health import FleetProbe

    settings = Settings()

    async def fresh() -> bool:
        redis = redis_client(settings)
        try:
            probe = FleetProbe(redis, worker_max_age_s=3 * settings.heartbeat_s)
            return bool(await probe.workers(socket.gethostname()))
        except RedisError:
            return False
        finally:
            await close_redis(redis)

    raise typer.Exit(0 if asyncio.run(fresh()) else 1)


@health.command("frontend")
def health_frontend(
    url: Annotated[
        str, typer.Option(help="The frontend's /readyz.")
    ] = "http://127.0.0.1:8000/readyz",
) -> None:
    """Healthy when the frontend can accept changes: it answers and reaches Redis.

    Not /readyz's own verdict, which also needs a live worker and Prefect: a
    frontend keeps queueing changes through a Prefect outage, and restarting it
    then would only drop callers.
    """
    try:
        body = httpx.get(url, timeout=3).json()
        ok = isinstance(body, dict) and body.get("redis") == "ok"
    except (httpx.HTTPError, ValueError):
        ok = False
    raise typer.Exit(0 if ok else 1)


@health.command("http")
def health_http(url: Annotated[str, typer.Option(help="URL that must answer 200.")]) -> None:
    """Healthy when URL answers 200 (e.g. the frontend's /readyz)."""
    try:
        ok = httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        ok = False
    raise typer.Exit(0 if ok else 1)
