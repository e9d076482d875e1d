"""compose.yaml run as shipped, through docker-compose, on the private engine.

Only the images are swapped (tests/compose/override.yaml). The commands here are
the ones an operator types (`up -d`, `--scale`, `restart`, `stop`, `down`);
what they look at afterwards (health, exit codes, logs) is read from the engine.
"""

import asyncio
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.compose.dockerd import Engine, docker_cli
from tests.prefect_runs import PrefectRuns

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = (ROOT / "compose.yaml", Path(__file__).with_name("override.yaml"))
SERVICES = ("redis", "postgres", "prefect-server", "worker", "mcp-frontend")
COMPOSE_TIMEOUT_S = 300.0
CRASH_LOOP_RESTARTS = 5


class StackError(AssertionError):
    """A compose command failed, or the stack did not reach a state in time."""


def poll(
    predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.5
) -> None:
    """Check `predicate` every `interval_s` until it holds; StackError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise StackError(f"{what}: not so after {timeout_s:g} s")
        time.sleep(interval_s)


@dataclass(frozen=True)
class Container:
    """One container of the project, as the engine reports it now."""

    id: str
    name: str
    service: str
    running: bool
    health: str  # "healthy", "unhealthy", "starting", or "none" without a healthcheck
    exit_code: int
    restarts: int
    health_log: tuple[dict[str, Any], ...]

    @classmethod
    def from_inspect(cls, details: dict[str, Any]) -> "Container":
        state = details["State"]
        health = state.get("Health") or {}
        return cls(
            id=details["Id"],
            name=details["Name"].lstrip("/"),
            service=details["Config"]["Labels"]["com.docker.compose.service"],
            running=bool(state["Running"]),
            health=health.get("Status", "none"),
            exit_code=int(state["ExitCode"]),
            restarts=int(details.get("RestartCount", 0)),
            health_log=tuple(health.get("Log") or ()),
        )


@dataclass
class ComposeStack:
    """One compose project: `docker-compose -p <project> -f compose.yaml -f override.yaml`."""

    engine: Engine
    project: str
    env: dict[str, str]  # compose's own variables (PMQ_TOKENS_FILE, the image tags)
    log_dir: Path | None = None  # where `down` keeps the containers' logs it discards
    files: tuple[Path, ...] = COMPOSE_FILES  # more overlays after these for other topologies

    def compose(self, *args: str, timeout_s: float = COMPOSE_TIMEOUT_S) -> str:
        """Run a docker-compose command; its stdout, or StackError with its stderr."""
        argv = ["docker-compose", "-p", self.project]
        for file in self.files:
            argv += ["-f", str(file)]
        done = subprocess.run(
            [*argv, *args],
            env={**self.engine.env(), **self.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(
                f"docker-compose {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}"
            )
        return done.stdout

    def up(self, *services: str, workers: int | None = None) -> None:
        """`up -d` (of `services`, else all), with `--scale worker=N` if given."""
        scale = ["--scale", f"worker={workers}"] if workers is not None else []
        self.compose("up", "-d", *scale, *services)

    def down(self, *, volumes: bool = False) -> None:
        """`down` (`-v`: with the volumes), keeping the logs of the containers it removes."""
        if self.log_dir is not None and self.containers():
            self.log_dir.mkdir(parents=True, exist_ok=True)
            kept = self.log_dir / f"stack-{time.strftime('%H%M%S')}.log"
            kept.write_text(self.compose("logs", "--no-color", "--timestamps"))
        self.compose("down", "--remove-orphans", *(["-v"] if volumes else []))

    def containers(self, service: str | None = None) -> list[Container]:
        """The project's containers (of one service), running or not, oldest first."""
        labels = {"com.docker.compose.project": self.project}
        if service:
            labels["com.docker.compose.service"] = service
        listed = sorted(self.engine.containers(**labels), key=lambda c: c["Created"])
        return [Container.from_inspect(self.engine.inspect(c["Id"])) for c in listed]

    def running(self, service: str) -> list[Container]:
        return [c for c in self.containers(service) if c.running]

    def healthy(self, counts: dict[str, int]) -> bool:
        """Does each service run exactly `counts[service]` containers, all healthy?

        Raises StackError at once for a container the engine keeps restarting:
        no amount of waiting makes a crash loop healthy.
        """
        containers = self.containers()
        looping = [c.name for c in containers if c.restarts >= CRASH_LOOP_RESTARTS]
        if looping:
            raise StackError(f"restarted {CRASH_LOOP_RESTARTS}+ times: {looping}")
        for service, count in counts.items():
            running = [c for c in containers if c.service == service and c.running]
            if len(running) != count or any(c.health != "healthy" for c in running):
                return False
        return True

    def wait_healthy(self, counts: dict[str, int] | None = None, timeout_s: float = 180.0) -> None:
        """Wait until every service (or those in `counts`) is healthy, as `docker inspect` says.

        On failure the error carries each container's health and the last
        healthcheck outputs and log lines, which is what an operator would read.
        """
        wanted = counts or dict.fromkeys(SERVICES, 1)
        try:
            poll(lambda: self.healthy(wanted), timeout_s, f"healthy {wanted}", interval_s=1.0)
        except StackError as e:
            raise StackError(f"{e}\n{self.describe()}") from None

    def describe(self) -> str:
        """Every container's state, last healthcheck output and log tail, for an error."""
        lines = []
        for c in self.containers():
            lines.append(
                f"--- {c.name}: running={c.running} health={c.health} exit={c.exit_code} "
                f"restarts={c.restarts}"
            )
            for probe in c.health_log[-2:]:
                lines.append(
                    f"    healthcheck exit {probe['ExitCode']}: {probe['Output'][-300:]!r}"
                )
            tail = subprocess.run(
                [docker_cli(), "logs", "--tail", "15", c.id],
                env=self.engine.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=30,
                check=False,
            ).stdout
            lines.extend(f"    | {line}" for line in tail.splitlines())
        return "\n".join(lines)

    def logs(self, *services: str) -> str:
        """`docker-compose logs` of these services, without compose's `name | ` prefix."""
        return self.compose("logs", "--no-color", "--no-log-prefix", *services)

    def exec(self, container: Container, *argv: str, timeout_s: float = 30.0) -> str:
        """Run a command in a running container (as its user); its stdout."""
        return self.engine.docker("exec", container.id, *argv, timeout_s=timeout_s)


async def create_runs(prefect: PrefectRuns, count: int) -> list[tuple[str, str]]:
    """`count` PENDING runs, task and flow in turn, created 8 at a time.

    tests.fleet.make_runs creates them one by one for SQLite's sake; this
    Prefect writes to PostgreSQL, which takes them in parallel.
    """
    await prefect.flow_id()
    limit = asyncio.Semaphore(8)

    async def one(index: int) -> tuple[str, str]:
        async with limit:
            if index % 2:
                return "flow", await prefect.flow_run()
            return "task", await prefect.task_run()

    return list(await asyncio.gather(*(one(index) for index in range(count))))
