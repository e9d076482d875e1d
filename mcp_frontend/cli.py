"""`pmq`: serve the MCP frontend, run a worker, or run the whole stack locally."""

import enum
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from mcp_frontend.auth import TokenConfigError, load_tokens
from mcp_frontend.devstack import StartupError, client_config, dev_stack
from mcp_frontend.http import UnsafeBind, build_http_app, check_bind
from mcp_frontend.server import build_server
from worker.settings import Settings

app = typer.Typer(
    help="prefect-mcp-queue: queue Prefect state changes for fleets of agents.",
    no_args_is_help=True,
)


class Transport(enum.StrEnum):
    stdio = "stdio"
    http = "http"


def _logging() -> None:
    # stderr only: stdout carries the MCP stdio protocol.
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


@app.command()
def serve(
    transport: Annotated[
        Transport, typer.Option(help="stdio for desktop clients, http for others.")
    ] = Transport.stdio,
    host: Annotated[str | None, typer.Option(help="HTTP bind address [PMQ_HTTP_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [PMQ_HTTP_PORT].")] = None,
) -> None:
    """Run the MCP frontend."""
    _logging()
    settings = Settings()
    if transport is Transport.stdio:
        build_server(settings).run("stdio")  # the local user owns stdio: no tokens
        return
    bind_host = host or settings.http_host
    bind_port = port or settings.http_port
    try:
        tokens = load_tokens(settings.auth_tokens, settings.auth_tokens_file)
        check_bind(bind_host, has_tokens=bool(tokens), allow_open=settings.allow_open)
    except (TokenConfigError, UnsafeBind, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    public_url = settings.public_url or f"http://{bind_host}:{bind_port}"
    mcp = build_server(settings, tokens=tokens, public_url=public_url)
    allowed = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
    asgi = build_http_app(mcp, settings, host=bind_host, allowed_hosts=allowed)
    uvicorn.run(asgi, host=bind_host, port=bind_port, log_level="warning")


@app.command()
def worker() -> None:
    """Run an arq worker that applies queued changes to Prefect."""
    _logging()
    from worker.app import run_worker

    run_worker(Settings())


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
