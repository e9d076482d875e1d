"""A private Docker engine for the compose test, started and stopped by the test.

The engine gets its own socket, pid file and run state (`--exec-root`) in a
temporary folder, so it touches no other engine on the machine; only its image
store (`--data-root`) is kept between runs, outside the clone, so that a second
run builds nothing.
"""

import fcntl
import json
import os
import shutil
import signal
import socket as stdlib_socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from mcp_frontend.devstack import wait_until

DEFAULT_CACHE = Path("/var/cache/prefect-mcp-queue/docker")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class EngineError(RuntimeError):
    """The engine did not start, or a docker command failed; the message says why."""


def docker_cli() -> str:
    """The engine's own client (Debian's docker.io) where there is one, else any on PATH."""
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return shutil.which("docker") or "docker"


def unavailable_reason() -> str | None:
    """Why no Docker engine can start on this machine, or None when one can."""
    if os.geteuid() != 0:
        return "starting a Docker engine (dockerd) needs root; run `make test-compose` as root"
    missing = [tool for tool in ("dockerd", "docker-compose") if shutil.which(tool) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not installed, and this is not a machine where "
            "`make test-compose` could apt-get them"
        )
    return None


@dataclass
class Engine:
    """A running private engine: its socket, its log, and a client for its HTTP API."""

    socket: Path
    log_path: Path
    config_dir: Path
    api: httpx.Client

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """What the docker CLI and docker-compose need to talk to this engine, and no more."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "DOCKER_HOST": self.host,
            # No credential helpers or contexts from the host's ~/.docker.
            "DOCKER_CONFIG": str(self.config_dir),
            # The classic builder: `--network host` for RUN steps, and no buildx plugin needed.
            "DOCKER_BUILDKIT": "0",
            "COMPOSE_DOCKER_CLI_BUILD": "0",
        }

    def docker(self, *args: str, timeout_s: float = 120.0, stdin: IO[bytes] | None = None) -> str:
        """Run a docker CLI command against this engine; its stdout, or EngineError."""
        done = subprocess.run(
            [docker_cli(), *args],
            env=self.env(),
            stdin=stdin,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise EngineError(
                f"docker {' '.join(args)} exited {done.returncode}: {done.stderr.decode()[-3000:]}"
            )
        return done.stdout.decode()

    def containers(self, **labels: str) -> list[dict[str, Any]]:
        """Every container (running or not) carrying these labels, as the API lists them."""
        filters = json.dumps({"label": [f"{key}={value}" for key, value in labels.items()]})
        response = self.api.get("/containers/json", params={"all": "1", "filters": filters})
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()
        return found

    def inspect(self, container_id: str) -> dict[str, Any]:
        """`docker inspect` of one container."""
        response = self.api.get(f"/containers/{container_id}/json")
        response.raise_for_status()
        details: dict[str, Any] = response.json()
        return details

    def networks(self) -> list[dict[str, Any]]:
        response = self.api.get("/networks")
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()
        return found

    def has_image(self, tag: str) -> bool:
        return self.api.get(f"/images/{tag}/json").status_code == 200

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


@contextmanager
def private_engine(cache: Path = DEFAULT_CACHE) -> Iterator[Engine]:
    """Start dockerd with its image store in `cache`; stop it on exit, whatever happened."""
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache), tempfile.TemporaryDirectory(prefix="pmq-dockerd-") as tmp:
        work = Path(tmp)
        _refuse_stale_engine(cache)
        socket = work / "docker.sock"
        log_path = work / "dockerd.log"
        argv = [
            "dockerd",
            "--data-root",
            str(cache),
            "--exec-root",
            str(work / "exec"),
            "--pidfile",
            str(work / "dockerd.pid"),
            "--host",
            f"unix://{socket}",
            "--log-level",
            "warn",
        ]
        with log_path.open("ab") as log:
            # Its own session: a Ctrl-C meant for pytest must not reach the engine first.
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        api = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://docker", timeout=30
        )
        (work / "config").mkdir()
        engine = Engine(socket, log_path, work / "config", api)
        try:
            wait_until(
                lambda: process.poll() is not None or _answers(api, socket),
                START_TIMEOUT_S,
                "dockerd",
            )
            if process.poll() is not None:
                raise EngineError(f"dockerd exited {process.returncode}:\n{engine.log_tail()}")
            yield engine
        finally:
            api.close()
            _stop(process, work / "exec" / "containerd" / "containerd.pid")
            _unmount_under(work)


def _answers(api: httpx.Client, path: Path) -> bool:
    # httpx leaves a unix socket it failed to connect unclosed (a ResourceWarning, an
    # error under -W error): try the socket itself first.
    with stdlib_socket.socket(stdlib_socket.AF_UNIX) as probe:
        if probe.connect_ex(str(path)) != 0:
            return False
    try:
        return api.get("/_ping", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(process: "subprocess.Popen[bytes]", containerd_pid_file: Path) -> None:
    """SIGTERM, then SIGKILL; and the containerd it started, should it outlive it."""
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    if containerd_pid_file.exists():
        pid = int(containerd_pid_file.read_text().strip() or 0)
        if pid and _cmdline(pid).startswith("containerd"):
            os.kill(pid, signal.SIGTERM)


def _unmount_under(folder: Path) -> None:
    """The engine leaves its network namespace mounted under --exec-root; free the folder."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    points = [line.split()[1] for line in mounts if line.split()[1].startswith(f"{folder}/")]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


@contextmanager
def _exclusive(cache: Path) -> Iterator[None]:
    """One engine per image store at a time: two would corrupt it."""
    with (cache.parent / f"{cache.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EngineError(f"another compose test is using the image store {cache}") from None
        yield


def _refuse_stale_engine(cache: Path) -> None:
    """A dockerd left over from a killed run still owns the store: say so, touch nothing."""
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit():
            words = _cmdline(int(pid_dir.name)).split()
            if words[:1] == ["dockerd"] and f"--data-root {cache}" in " ".join(words):
                raise EngineError(
                    f"a dockerd from an earlier run still uses {cache} (pid {pid_dir.name}); "
                    f"stop it first: kill {pid_dir.name}"
                )


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()
